"""Throughput of `tierq serve --workers 2` vs `--workers 1` in the same run,
and requests per gateway CPU-second (utime + stime of the supervisor and its
workers, from /proc/<pid>/stat). Backend: the simulated backend with instant
answers and ample slots, so the gateway is what is measured.

    python bench/workers/run.py [--seconds 5] [--clients 64] [--rounds 3] [--name workers]

Writes bench/results/<name>.json: the figures printed, with the load average
before and after and when.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tierq.sim import start_sim

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of `pid` and its children still alive (their own stat)."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    total = 0
    for p in pids:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / TICK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def load(url: str, seconds: float, clients: int) -> int:
    body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    done = 0
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def client() -> None:
            nonlocal done
            while time.monotonic() < stop:
                async with s.post(url, json=body) as r:
                    await r.read()
                    if r.status == 200:
                        done += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return done


async def one(workers: int, sim_url: str, seconds: float, clients: int, tmp: str) -> tuple[float, float]:
    port = free_port()
    cfg = os.path.join(tmp, f"w{workers}.toml")
    with open(cfg, "w") as f:
        f.write(f'''[server]\nhost = "127.0.0.1"\nport = {port}\n
[ledger]\nurl = "sqlite:///{tmp}/ledger-{workers}.db"\n
[[upstreams]]\nname = "sim"\nbase_url = "{sim_url}/v1"\nkind = "openai"\n
[[models]]\nid = "bench"\nupstream = "sim"\npriority = true\ninput_per_m = "1"\noutput_per_m = "1"\n
[models.admission]\nmax_concurrency = 32\nqueue_depth = 1024\n''')
    proc = subprocess.Popen([sys.executable, "-m", "tierq", "serve", "--config", cfg, "--workers", str(workers)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        for _ in range(200):
            try:
                if await load(url, 0.05, 1) > 0:
                    break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
        await load(url, 0.5, clients)  # warm-up
        c0, t0 = cpu_s(proc.pid), time.monotonic()
        n = await load(url, seconds, clients)
        c1, t1 = cpu_s(proc.pid), time.monotonic()
        return n / (t1 - t0), n / max(c1 - c0, 1e-9)
    finally:
        proc.terminate()
        proc.wait(20)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="workers", help="bench/results/NAME.json ('' for none)")
    a = ap.parse_args()
    load_before = os.getloadavg()
    sim = await start_sim(slots=4096, ttft_ms=0, tokens_per_s=0)
    runs: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(a.rounds):  # interleaved, the order turned each round
                for w in ((1, 2) if i % 2 == 0 else (2, 1)):
                    runs[w].append(await one(w, sim.url.rstrip("/").removesuffix("/v1"),
                                             a.seconds, a.clients, tmp))
    finally:
        await sim.close()
    r1, r2 = ((statistics.median(x for x, _ in runs[w]), statistics.median(y for _, y in runs[w]))
              for w in (1, 2))
    print(f"median of {a.rounds} interleaved rounds")
    print(f"host cores: {os.cpu_count()} (load generator and sim share them)")
    print(f"--workers 1: {r1[0]:8.0f} req/s  {r1[1]:8.0f} req per gateway CPU-s")
    print(f"--workers 2: {r2[0]:8.0f} req/s  {r2[1]:8.0f} req per gateway CPU-s")
    print(f"ratio 2/1:   {r2[0] / r1[0]:8.2f} x     {r2[1] / r1[1]:8.2f} x")
    if a.name:
        out = Path(__file__).resolve().parent.parent / "results" / f"{a.name}.json"
        out.write_text(json.dumps({
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
            "load_before": load_before, "load_after": os.getloadavg(), "args": vars(a),
            "rounds": {f"workers_{w}": [{"req_per_s": x, "req_per_cpu_s": y} for x, y in runs[w]]
                       for w in (1, 2)},
            "workers_1": {"req_per_s": r1[0], "req_per_cpu_s": r1[1]},
            "workers_2": {"req_per_s": r2[0], "req_per_cpu_s": r2[1]},
            "ratio_2_1": {"req_per_s": r2[0] / r1[0], "req_per_cpu_s": r2[1] / r1[1]},
        }, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
