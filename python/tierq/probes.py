"""The background half of replica health (tierq.health): ejected replicas that
refused connections are probed with a TCP connect, and whoever routes is told
when a replica's state or slow-start share moves, so the core's view of which
replicas are in rotation, and at what limit, follows the detector's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Final

import yarl

from tierq.health import Health, ReplicaState

__all__ = ["HealthLoop", "TICK_S", "probe", "target_of"]

log = logging.getLogger("tierq.health")

# How often the loop reads the detector: a 5xx ejection ends, or a slow start
# moves a step, at most this late.
TICK_S: Final = 0.1


def target_of(url: str) -> tuple[str, int]:
    """The host and port a probe connects to for an endpoint URL."""
    u = yarl.URL(url)
    host = u.raw_host or "127.0.0.1"
    port = u.port or (443 if u.scheme == "https" else 80)
    return host.strip("[]"), port


async def probe(host: str, port: int, timeout_s: float) -> bool:
    """Whether `host:port` accepts a TCP connection within `timeout_s`."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class HealthLoop:
    """Runs one upstream's probes and tells `on_change` (the replica's index,
    its state and its share of its limit) when what routing reads moved: a
    replica ejected, back, or a step further in its slow start.

    `name`: the upstream's, for the log. Start with `start()` in the loop that
    serves; `stop()` waits for it to end."""

    def __init__(self, name: str, health: Health, endpoints: Sequence[str],
                 on_change: Callable[[int, ReplicaState, float], None],
                 connect_timeout_s: float = 1.0, tick_s: float = TICK_S) -> None:
        if len(endpoints) != health.replicas:
            raise ValueError(f"{len(endpoints)} endpoints for {health.replicas} replicas")
        self.name = name
        self.health = health
        self.endpoints = list(endpoints)
        self._targets = [target_of(url) for url in endpoints]
        self._on_change = on_change
        self._timeout_s = min(connect_timeout_s, health.settings.probe_interval_s)
        self._tick_s = tick_s
        self._seen: list[tuple[ReplicaState, float]] = [(ReplicaState.HEALTHY, 1.0)] * health.replicas
        self._task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"health-{self.name}")

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *self._probes] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._task = None
        self._probes.clear()

    def check(self) -> None:
        """Reads the detector once: due probes started, changes told. The
        request path calls it too, right after an outcome ejected a replica,
        so the next request is routed around it without waiting for a tick."""
        for i in self.health.probe_due():
            task = asyncio.get_running_loop().create_task(self._probe(i))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)
        for i in range(self.health.replicas):
            state = self.health.state(i)
            share = self.health.share(i)
            if (state, share) == self._seen[i]:
                continue
            before = self._seen[i][0]
            self._seen[i] = (state, share)
            if state is not before:
                log.warning("upstream %s: replica %d (%s) %s", self.name, i, self.endpoints[i],
                            _said(state, self.health, i))
            self._on_change(i, state, share)

    async def _probe(self, i: int) -> None:
        host, port = self._targets[i]
        self.health.probed(i, await probe(host, port, self._timeout_s))

    async def _run(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # a bug in a callback must not end the probes
                log.exception("upstream %s: health check failed", self.name)
            await asyncio.sleep(self._tick_s)


def _said(state: ReplicaState, health: Health, i: int) -> str:
    if state is ReplicaState.EJECTED:
        left = health.ejected_for_s(i)
        how = ("until it accepts connections again (probed every "
               f"{health.settings.probe_interval_s:g} s)") if left is None or left == float("inf") \
            else f"for {left:.0f} s"
        return f"ejected after {health.settings.consecutive_failures} failures in a row, {how}"
    if state is ReplicaState.SLOW_START:
        return f"back in rotation, slow start over {health.settings.slow_start_s:g} s"
    return "in rotation"
