"""A real `redis-server` for the cluster tests: its own temporary folder, a free
loopback port, no persistence (a restarted server starts empty, as a lease
store should), stopped and started again on the same port for outage tests.

Outside CI the tests that need it skip when redis-server is not installed; in
CI (CI set) a missing server is a failure (`.ci/run` installs Debian's).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import free_port


def _binary(name: str, needed_by: str) -> str:
    """The `name` binary (on PATH or Debian's /usr/bin); skips when there is
    none, and fails in CI (CI set), which must run `needed_by`."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (CI must run {needed_by})")
        pytest.skip(f"{name} is not installed (apt-get install {name})")
    return found


def _until_pong(proc: subprocess.Popen[bytes], port: int, log: Path, name: str) -> None:
    """Waits until the server `proc` started on `port` answers PING (20 s at most)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{name} did not answer PING within 20 s")


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def redis_server_binary() -> str:
    """The redis-server to run; skips (fails in CI) when there is none."""
    return _binary("redis-server", "the cluster tests")


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`, data in `folder`."""

    def __init__(self, folder: Path, args: tuple[str, ...] = ()) -> None:
        """`args`: more options, as `("--replicaof", "127.0.0.1 6379")`."""
        self.binary = redis_server_binary()
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None, "already running"
        with (self.folder / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                 str(self.folder), "--save", "", "--appendonly", "no", "--protected-mode", "yes",
                 *self.args],
                stdout=log, stderr=log)
        _until_pong(self.proc, self.port, self.folder / "redis.log", "redis-server")

    def kill(self) -> None:
        """SIGKILL, as a crashed or lost primary: no goodbye to anyone."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        _terminate(self.proc)
        self.proc = None


def redis_sentinel_binary() -> str:
    """The redis-sentinel to run (Debian's redis-sentinel package); skips
    (fails in CI) when there is none."""
    return _binary("redis-sentinel", "the failover test")


class RedisSentinel:
    """One redis-sentinel on 127.0.0.1 watching `master` at `primary_port`.
    A sentinel rewrites its config file, so each has its own in `folder`."""

    def __init__(self, folder: Path, master: str, primary_port: int, quorum: int,
                 down_after_ms: int = 500) -> None:
        self.binary = redis_sentinel_binary()
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = free_port()
        self.down_after_ms = down_after_ms
        (folder / "sentinel.conf").write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor {master} 127.0.0.1 {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {master} {down_after_ms}\n"
            f"sentinel failover-timeout {master} 5000\n"
            f"sentinel parallel-syncs {master} 1\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.folder / "sentinel.log").open("ab") as log:
            self.proc = subprocess.Popen([self.binary, str(self.folder / "sentinel.conf")],
                                         stdout=log, stderr=log)
        _until_pong(self.proc, self.port, self.folder / "sentinel.log", "redis-sentinel")

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
