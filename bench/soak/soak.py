"""Soak: `tierq serve` in a child process under mixed load with client hang-ups.

Samples the gateway's RSS and open file descriptors once a second. After a
warm-up (the first 20% of the run) RSS must stay within 10% of its warm-up
level, fds must come back to their idle level, and nothing may be in flight
afterwards. `python bench/soak/soak.py --seconds 600` is the long run;
tests/test_reliability_soak.py runs a short one in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tierq.sim import start_sim

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
POOL = 12  # the model's max_concurrency: the upstream pool's size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _client(root: str, stop: float, rng: random.Random, counts: dict[str, int]) -> None:
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < stop:
            stream = rng.random() < 0.5
            hang_up = rng.random() < 0.2
            body = orjson.dumps({
                "model": MODEL, "stream": stream, "max_tokens": rng.randint(1, 40),
                "messages": [{"role": "user", "content": "soak " * rng.randint(1, 50)}],
                "service_tier": rng.choice(["priority", "default", None])})
            try:
                async with s.post(root + "/v1/chat/completions", data=body,
                                  headers={"Content-Type": "application/json"},
                                  timeout=aiohttp.ClientTimeout(total=30)) as r:
                    if hang_up:
                        await r.content.readany()
                        r.close()
                        counts["hung_up"] += 1
                        continue
                    await r.read()
                    counts[str(r.status)] = counts.get(str(r.status), 0) + 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                counts["client_error"] += 1


async def soak(seconds: float, clients: int = 32, workdir: Path | None = None) -> dict[str, Any]:
    tmp = Path(workdir or tempfile.mkdtemp(prefix="tierq-soak-"))
    sim = await start_sim("127.0.0.1", 0, slots=16, ttft_ms=10.0, tokens_per_s=400.0)
    port = _free_port()
    config = tmp / "tierq.toml"
    config.write_text(f"""
[server]
port = {port}
[ledger]
url = "sqlite:///{tmp / 'soak.db'}"
[[upstreams]]
name = "sim"
base_url = "{sim.url}"
kind = "vllm"
[[models]]
id = "{MODEL}"
upstream = "sim"
[models.admission]
max_concurrency = {POOL}
queue_depth = 16
max_wait_ms = {{ default = 500, priority = 2000 }}
""")
    log = open(tmp / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tierq", "serve", "--config", str(config)],
                            stdout=log, stderr=log)
    root = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(400):
                try:
                    async with s.get(root + "/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        idle_fds = _fds(proc.pid)
        counts: dict[str, int] = {"hung_up": 0, "client_error": 0}
        stop = time.monotonic() + seconds
        tasks = [asyncio.create_task(_client(root, stop, random.Random(i), counts))
                 for i in range(clients)]
        samples: list[tuple[float, int, int]] = []
        t0 = time.monotonic()
        while not all(t.done() for t in tasks):
            samples.append((time.monotonic() - t0, _rss_kb(proc.pid), _fds(proc.pid)))
            await asyncio.sleep(1.0)
        await asyncio.gather(*tasks)
        await asyncio.sleep(1.5)  # hung-up requests settle
        async with aiohttp.ClientSession() as s, s.get(root + "/metrics") as r:
            metrics = await r.text()
        in_flight = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith("tierq_admission_in_flight"))
        final_rss, final_fds = _rss_kb(proc.pid), _fds(proc.pid)
        warm = [rss for t, rss, _ in samples if t >= 0.2 * seconds]
        warm_rss = warm[0] if warm else final_rss
        # Upstream keep-alive connections stay pooled (at most max_concurrency).
        fds_warm = idle_fds + POOL
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=40)
        return {
            "seconds": seconds, "clients": clients, "requests": sum(counts.values()),
            "outcomes": counts, "rc": rc, "in_flight_after": in_flight,
            "sim_in_flight_after": sim.state.in_flight,
            "rss_kb_warm": warm_rss, "rss_kb_final": final_rss,
            "rss_kb_max_after_warm": max(warm or [final_rss]),
            "rss_drift": (max(warm or [final_rss]) - warm_rss) / warm_rss,
            "fds_idle": idle_fds, "fds_warm": fds_warm, "fds_final": final_fds,
            "fds_max": max(f for _, _, f in samples) if samples else final_fds,
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        await sim.close()


def check(result: dict[str, Any]) -> list[str]:
    """What the run violated (empty when it passed)."""
    bad = []
    if result["rss_drift"] > 0.10:
        bad.append(f"RSS grew {result['rss_drift']:.1%} after warm-up (limit 10%)")
    # With every client gone, only the listener, the ledger and the upstream
    # pool's keep-alive connections may stay open: fds must not grow with the run.
    if result["fds_final"] > result["fds_warm"] + 2:
        bad.append(f"fds {result['fds_final']} after the load, over idle + pool "
                   f"({result['fds_warm']})")
    if result["in_flight_after"] or result["sim_in_flight_after"]:
        bad.append("requests still in flight after the load")
    if result["rc"] != 0:
        bad.append(f"SIGTERM exit status {result['rc']}")
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--clients", type=int, default=32)
    args = p.parse_args()
    result = asyncio.run(soak(args.seconds, args.clients))
    problems = check(result)
    print(json.dumps({**result, "problems": problems}, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
