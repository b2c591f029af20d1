"""A supervisor killed -9 leaves its shared-memory blocks in /dev/shm and its
`tierq-run-*` folder; the next start removes them, and says so in one line,
while a supervisor still running keeps its own (its lock is held, whatever
its pid)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tierq import PoolSettings
from tierq.workers import SHM_DIR, SharedPools, sweep_stale

from ports import free_port

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="needs /dev/shm (Linux)")
MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
# A process that makes a host's blocks (two pools and the key table), prints its
# token and waits to be killed.
_HOLDER = """
import sys, time
from tierq import PoolSettings
from tierq.workers import SharedPools
sp = SharedPools({"a": PoolSettings(max_concurrency=2), "b": PoolSettings(max_concurrency=2)}, 2,
                 key_capacity=64)
print(sp.run_dir, flush=True)
time.sleep(600)
"""


def _holder() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    run_dir = proc.stdout.readline().strip()
    assert run_dir, "the holder made its blocks"
    return proc, Path(run_dir).name.removeprefix("tierq-run-")


def _left(token: str) -> list[str]:
    return sorted(p.name for p in Path(SHM_DIR).glob(f"tierq-{token}*")) + sorted(
        p.name for p in Path(SHM_DIR).glob(f"tierq-run-{token}"))


def test_a_killed_supervisors_blocks_are_swept_and_a_live_ones_kept(
        caplog: pytest.LogCaptureFixture) -> None:
    dead, dead_token = _holder()
    live, live_token = _holder()
    try:
        assert _left(dead_token) == sorted([f"tierq-{dead_token}-0", f"tierq-{dead_token}-1",
                                            f"tierq-{dead_token}-keys", f"tierq-{dead_token}.lock"]
                                           ) + [f"tierq-run-{dead_token}"]
        dead.send_signal(signal.SIGKILL)
        dead.communicate()
        assert len(_left(dead_token)) == 5, "kill -9 leaves them all"
        with caplog.at_level(logging.WARNING, logger="tierq.workers"):
            sp = SharedPools({"m": PoolSettings(max_concurrency=1)}, 1)
        try:
            assert _left(dead_token) == [], "the next start removed the dead one's"
            assert len(_left(live_token)) == 5, "a running supervisor's are kept"
            lines = [r.getMessage() for r in caplog.records if dead_token.split("-")[0] in r.getMessage()]
            assert lines == [f"removed what supervisor {dead_token.split('-')[0]} left (gone): "
                             f"3 shared-memory blocks in {SHM_DIR} and {SHM_DIR}/tierq-run-{dead_token}"]
            assert sweep_stale() == [], "nothing more to sweep while the others run"
        finally:
            sp.close()
    finally:
        live.kill()
        live.communicate()
        if dead.poll() is None:
            dead.kill()
            dead.communicate()
    assert live_token in sweep_stale(), "killed too, its blocks go on the next sweep"
    assert _left(live_token) == []


def _serve(tmp_path: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    cfg = tmp_path / "tierq.toml"
    cfg.write_text(f'[ledger]\nurl = "sqlite:///{tmp_path / "tierq.db"}"\n[[upstreams]]\nname = "sim"\n'
                   f'kind = "sim"\n[[models]]\nid = "{MODEL}"\n')
    with log.open("wb") as err:
        # A session of its own: the kill takes the supervisor and its workers, as a host's death does.
        return subprocess.Popen([sys.executable, "-m", "tierq", "serve", "--config", str(cfg), "--port",
                                 str(port), "--workers", "2", "--no-access-log", "--log-level", "warning"],
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=5) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return False
    return bool(body["ready"]) and body["workers"] == 2


def _until(cond: object, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        if callable(cond) and cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: {log.read_text()}")


@pytest.mark.timeout(120)
def test_tierq_serve_killed_minus_9_is_cleaned_up_by_the_next_start(tmp_path: Path) -> None:
    port = free_port()
    first = _serve(tmp_path, port, tmp_path / "first.log")
    try:
        _until(lambda: any(Path(SHM_DIR).glob(f"tierq-run-{first.pid}-*")), "first serve's run folder",
               first, tmp_path / "first.log")
        [run] = Path(SHM_DIR).glob(f"tierq-run-{first.pid}-*")
        token = run.name.removeprefix("tierq-run-")
        _until(lambda: len(_left(token)) == 3, "its pool block and lock", first, tmp_path / "first.log")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    left = _left(token)
    assert f"tierq-{token}-0" in left and f"tierq-run-{token}" in left, left

    second = _serve(tmp_path, port, tmp_path / "second.log")
    try:
        _until(lambda: f"removed what supervisor {first.pid} " in (tmp_path / "second.log").read_text(),
               "the second start's sweep line", second, tmp_path / "second.log")
        assert _left(token) == []
        _until(lambda: _ready(port), "the second serve ready with its 2 workers", second,
               tmp_path / "second.log")
        swept = [line for line in (tmp_path / "second.log").read_text().splitlines()
                 if f"removed what supervisor {first.pid} " in line]
        assert len(swept) == 1 and f"supervisor {first.pid} left (gone): 1 shared-memory block in" in swept[0]
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
