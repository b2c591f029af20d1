"""What the cluster benchmarks share: a real redis-server (tests/redis_server.py),
`tierq sim` and `tierq serve` processes on free loopback ports, CPU seconds from
/proc, percentiles."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from ports import free_port  # noqa: E402
from redis_server import RedisServer  # noqa: E402

__all__ = ["MODEL", "RedisServer", "Serve", "cpu_s", "free_port", "percentile", "start_sim",
           "wait_ready"]

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of `pid` (seconds)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class Serve:
    """One `tierq serve` process."""

    def __init__(self, tmp: Path, name: str, sim_url: str, *, limit: int,
                 redis_url: str | None = None, keys_db: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cluster = (f'[cluster]\nredis_url = "{redis_url}"\nhost_id = "{name}"\n'
                   if redis_url else "")
        keys = f'[keys]\npath = "{keys_db}"\n' if keys_db else ""
        cfg = tmp / f"{name}.toml"
        cfg.write_text(f"""
[ledger]
url = "sqlite:///{tmp / f'{name}.db'}"
{keys}
{cluster}
[[upstreams]]
name = "sim"
kind = "openai"
base_url = "{sim_url}/v1"
[[models]]
id = "{MODEL}"
upstream = "sim"
[models.admission]
max_concurrency = {limit}
""")
        with (tmp / f"{name}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tierq", "serve", "--config", str(cfg), "--port",
                 str(self.port), "--no-access-log", "--log-level", "warning"],
                stdout=subprocess.DEVNULL, stderr=log)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_sim(tmp: Path, slots: int = 256) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with (tmp / "sim.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tierq", "sim", "--host", "127.0.0.1",
                                 "--port", str(port), "--slots", str(slots), "--ttft-ms", "0",
                                 "--tokens-per-s", "0"], stdout=subprocess.DEVNULL, stderr=log)
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(urls: list[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        for url in urls:
            while True:
                try:
                    async with s.get(url + "/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} not ready")
                await asyncio.sleep(0.05)
