"""One process per core: a supervisor forks N workers that accept on one
listening socket and share ONE admission state per pool (a shared-memory
block made by the Rust core), restarts a worker that dies after settling what
it held, and stops them all on SIGTERM.

Wake-up: the supervisor makes one eventfd per worker before forking; every
worker inherits all of them. When a worker decides a waiter owned by another
(a grant, an eviction, an expiry), the core posts it to the owner's mailbox
and writes the owner's eventfd, which the owner's event loop watches with
`loop.add_reader`. No polling, no lock across processes.

Key changes: each worker caches the keys it has checked. A worker that
changes a key (the admin API) writes every other worker's key eventfd (one
more per worker, made the same way); each drops its cached keys when it
sees its own, so a revocation holds on every worker of the host at once.

Reloads are ordered (`ReloadBarrier`): on SIGHUP every worker swaps its own
config (prices, models, upstreams, keys) and reports over a pipe; only when
every live worker has reported a swap does the supervisor tell them (one more
eventfd each) to retune their pools' limits, so a waiter a raised limit
grants is always on a worker that already holds the new config.

Per-key limits use one `SharedKeyBuckets` table for the host, and /metrics
reports the host: every worker publishes its `WorkerSnapshot` to a run
directory (`SnapshotBoard`) and a scrape of any worker reads them all.

What a supervisor leaves if it is killed -9 (its blocks in /dev/shm, its run
directory) is named by one token, `<pid>-<start ns>`, beside a lock file the
supervisor and its workers hold (flock) for their lives; the next SharedPools
on the host removes what belongs to a token whose lock nobody holds
(`sweep_stale`). A pid alone could not tell: a container's next supervisor
often gets the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import select
import signal
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Final

from aiohttp import web

from tierq._core import AdmissionCore, PoolSettings, Replicas, SharedKeyBuckets
from tierq.admission import Admission
from tierq.metrics import WorkerSnapshot, snapshot_from_json, snapshot_to_json
from tierq.status import METRICS_SOURCE, MetricsSource

__all__ = ["KEY_TABLE_CAPACITY", "PUBLISH_INTERVAL_S", "ReloadBarrier", "SharedPools", "SnapshotBoard",
           "Supervisor", "WorkerPools", "listen", "sweep_stale"]

#: Keys the host-wide per-key limit table holds (`[keys] table_capacity`).
KEY_TABLE_CAPACITY: Final = 4096
#: How often a worker publishes its snapshot for the others' scrapes.
PUBLISH_INTERVAL_S: Final = 0.25

log = logging.getLogger("tierq.workers")

#: Where POSIX shared-memory blocks appear as files (Linux).
SHM_DIR: Final = "/dev/shm"


def _run_parent() -> str:
    """tmpfs when there is one: snapshots are rewritten 4 times a second."""
    return SHM_DIR if os.path.isdir(SHM_DIR) else tempfile.gettempdir()


def _hold_lock(directory: str, token: str) -> int:
    """`tierq-<token>.lock` in `directory`, flocked by this process (and its
    forks, which share the open file) until it exits; its fd. Locked under a
    temporary name, then renamed: a sweep never sees it unlocked."""
    tmp = os.path.join(directory, f".tierq-{token}.lock.new")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp, os.path.join(directory, f"tierq-{token}.lock"))
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd


def sweep_stale(directory: str | None = None, shm: str = SHM_DIR) -> list[str]:
    """Removes the blocks (in `shm`) and run directory (in `directory`) of every
    supervisor whose lock in `directory` nobody holds any more; logs one line
    each and returns the tokens removed. Blocks of a supervisor still running,
    or of one from before these locks, are left alone."""
    directory = directory or _run_parent()
    removed: list[str] = []
    for lock in sorted(Path(directory).glob("tierq-*.lock")):
        token = lock.name[len("tierq-"):-len(".lock")]
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # another start swept it first
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its supervisor or a worker of it is alive
            try:
                if os.stat(lock).st_ino != os.fstat(fd).st_ino:
                    continue
            except FileNotFoundError:
                continue
            blocks = [p for p in Path(shm).glob(f"tierq-{token}-*") if p.is_file()]
            for p in blocks:
                p.unlink(missing_ok=True)
            run = Path(directory, f"tierq-run-{token}")
            had_run = run.is_dir()
            shutil.rmtree(run, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed.append(token)
            log.warning("removed what supervisor %s left (gone): %d shared-memory block%s in %s%s",
                        token.split("-")[0], len(blocks), "" if len(blocks) == 1 else "s", shm,
                        f" and {run}" if had_run else "")
        finally:
            os.close(fd)
    return removed


class SharedPools:
    """The supervisor's side: one shared state block per pool, one eventfd per worker.

    Made before forking. `attach(i)` (in worker i) gives that worker its
    `WorkerPools`; `reclaim(i)` (in the supervisor, once worker i is dead)
    releases the slots it held and drops its waiters; `close()` removes the blocks.
    """

    def __init__(self, pools: Mapping[str, PoolSettings], workers: int,
                 key_capacity: int | None = None,
                 replicas: Mapping[str, tuple[int, PoolSettings]] | None = None) -> None:
        """`replicas`: for a pool over several endpoints, how many and one
        replica's settings: its replicas' region (core/replicas.rs), beside
        its block."""
        if workers < 1:
            raise ValueError(f"workers: must be at least 1, got {workers}")
        self.workers = workers
        self.settings = dict(pools)
        parent = _run_parent()
        sweep_stale(parent)
        token = f"{os.getpid()}-{time.monotonic_ns() % 1_000_000_000}"
        self._lock_fd: int | None = _hold_lock(parent, token)
        self._lock = os.path.join(parent, f"tierq-{token}.lock")
        prefix = f"/tierq-{token}"
        self.names = {pool: f"{prefix}-{i}" for i, pool in enumerate(self.settings)}
        self.keys_name = f"{prefix}-keys"
        self.wake_fds: list[int] = []
        self.key_fds: list[int] = []
        self._cores: dict[str, AdmissionCore] = {}
        self.replica_settings = dict(replicas or {})
        self.replica_names = {pool: f"{self.names[pool]}-replicas" for pool in self.replica_settings}
        self._replicas: dict[str, Replicas] = {}
        self._keys: SharedKeyBuckets | None = None
        self.run_dir: str | None = None
        self.barrier: ReloadBarrier | None = None
        try:
            self.barrier = ReloadBarrier(workers)
            self.wake_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(workers)]
            self.key_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(workers)]
            for pool, s in self.settings.items():
                self._cores[pool] = AdmissionCore.create_shared(self.names[pool], workers, self.wake_fds, s)
            for pool, (n, rs) in self.replica_settings.items():
                self._replicas[pool] = Replicas.create_shared(self.replica_names[pool], n, workers, rs)
            if key_capacity is not None:
                self._keys = SharedKeyBuckets.create(self.keys_name, key_capacity)
            self.run_dir = os.path.join(parent, f"tierq-run-{token}")
            os.mkdir(self.run_dir, 0o700)
        except BaseException:
            self.close()
            raise

    def attach(self, worker: int) -> WorkerPools:
        """Worker `worker`'s handles on every pool (call in that worker, after fork)."""
        assert self.run_dir is not None
        return WorkerPools(
            {
                pool: Admission.shared(self.names[pool], worker, self.wake_fds, s)
                for pool, s in self.settings.items()
            },
            self.wake_fds[worker],
            key_buckets=SharedKeyBuckets.attach(self.keys_name) if self._keys is not None else None,
            board=SnapshotBoard(self.run_dir, worker, self.workers),
            index=worker,
            key_fds=self.key_fds,
            barrier=self.barrier,
            replicas={pool: Replicas.attach_shared(self.replica_names[pool], n, worker, rs)
                      for pool, (n, rs) in self.replica_settings.items()},
        )

    def withhold_all(self) -> None:
        """Takes every slot of every pool out of use (a `[cluster]` host starts
        holding nothing; its lease agent, in worker 0, restores what Redis
        leases it). Call before forking."""
        for core in self._cores.values():
            core.withhold(core.limit)

    def reclaim(self, worker: int) -> tuple[int, int]:
        """Settles dead worker `worker` in every pool: (slots released, waiters dropped)."""
        slots = waiters = 0
        # Its replica holds first: the pool's reclaim passes its slots on to
        # waiters, who then take replicas (core/replicas.rs).
        for replicas in self._replicas.values():
            replicas.reclaim(worker)
        for core in self._cores.values():
            s, w, _ = core.reclaim(worker)
            slots, waiters = slots + s, waiters + w
        # A fresh worker starts with an empty wake-up counter.
        try:
            os.eventfd_read(self.wake_fds[worker])
        except BlockingIOError:
            pass
        return slots, waiters

    def stats(self) -> dict[str, dict[str, object]]:
        return {pool: core.stats() for pool, core in self._cores.items()}

    def held(self, pool: str) -> list[int]:
        """Slots each worker holds in `pool`."""
        return [self._cores[pool].held_by(i) for i in range(self.workers)]

    def replica_stats(self, pool: str) -> list[dict[str, int | bool]]:
        """Each replica of `pool` host-wide (in flight, limit, grants...)."""
        return self._replicas[pool].stats()

    def close(self) -> None:
        for pool in list(self._cores):
            AdmissionCore.unlink_shared(self.names[pool])
            del self._cores[pool]
        for pool in list(self._replicas):
            Replicas.unlink_shared(self.replica_names[pool])
            del self._replicas[pool]
        if self._keys is not None:
            SharedKeyBuckets.unlink(self.keys_name)
            self._keys = None
        for fd in [*self.wake_fds, *self.key_fds]:
            os.close(fd)
        if self.barrier is not None:
            self.barrier.close()
            self.barrier = None
        self.wake_fds = []
        self.key_fds = []
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
        if self._lock_fd is not None:
            os.unlink(self._lock)
            os.close(self._lock_fd)
            self._lock_fd = None


class ReloadBarrier:
    """Orders a reload with several workers: swap everywhere, then retune.

    Made by the supervisor before forking. Two words of anonymous shared
    memory: the round signalled (written by the supervisor before it sends
    SIGHUP) and the round committed. A worker that has reloaded (swapped its
    config, its pools' limits left as they were) reports `index round ok` on
    one pipe (a line under PIPE_BUF: written whole); once every live worker
    has reported the open round and none failed, the supervisor commits it
    and writes each worker's `commit_fds` eventfd, and each worker then
    retunes its pools. A worker that fails to load fails the round: nothing is
    retuned. A worker forked during a round applies the round's bytes and
    reports it too; one forked after a commit sees it committed and retunes
    at once. `gen`: the round as this process last knew it (the supervisor's
    at fork: what a replacement's reload bytes belong to).
    """

    def __init__(self, workers: int) -> None:
        self._words = mmap.mmap(-1, 16)  # [signalled, committed], MAP_SHARED
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.commit_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(workers)]
        self.gen = 0
        self._waiting: set[int] = set()  # supervisor: workers the open round waits for
        self._failed: list[int] = []
        self._open = 0  # supervisor: the round open (0: none)
        self._buf = b""

    @property
    def signalled(self) -> int:
        return int(struct.unpack_from("<Q", self._words, 0)[0])

    @property
    def committed(self) -> int:
        return int(struct.unpack_from("<Q", self._words, 8)[0])

    # -- the supervisor's side

    def fileno(self) -> int:
        return self._r

    def open(self, live: set[int]) -> int:
        """A new round for the workers `live` (call before signalling them)."""
        self.gen += 1
        struct.pack_into("<Q", self._words, 0, self.gen)
        self._open, self._waiting, self._failed = self.gen, set(live), []
        return self.gen

    def read_reports(self) -> None:
        """Takes the reports on the pipe; commits the open round when complete."""
        while True:
            try:
                chunk = os.read(self._r, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            index, gen, ok = (int(x) for x in line.split())
            if gen != self._open or index not in self._waiting:
                continue  # a round given up for a newer one, or already done
            self._waiting.discard(index)
            if not ok:
                self._failed.append(index)
        if self._open and not self._waiting:
            gen, self._open = self._open, 0
            if self._failed:
                log.error("reload %d: worker %s did not apply the config; no pool retuned", gen,
                          ", ".join(map(str, sorted(self._failed))))
                return
            struct.pack_into("<Q", self._words, 8, gen)
            for fd in self.commit_fds:
                os.eventfd_write(fd, 1)
            log.info("reload %d: every worker holds the new config; pools retuned", gen)

    # -- a worker's side

    def report(self, index: int, gen: int, ok: bool) -> None:
        os.write(self._w, b"%d %d %d\n" % (index, gen, ok))

    def close(self) -> None:
        for fd in [self._r, self._w, *self.commit_fds]:
            os.close(fd)
        self.commit_fds = []
        self._words.close()


class WorkerPools(Mapping[str, Admission]):
    """A worker's `Admission` per pool, plus the reader that delivers its mail,
    the host's per-key buckets (`key_buckets`), its snapshot board, and the
    key eventfds (`key_fds`, one per worker: `keys_changed` tells the others,
    `on_keys_changed` is what this one does when told), and the reload
    barrier (`on_commit`: what this one does when a round is committed)."""

    def __init__(self, pools: dict[str, Admission], wake_fd: int,
                 key_buckets: SharedKeyBuckets | None = None,
                 board: SnapshotBoard | None = None, index: int = 0,
                 key_fds: list[int] | None = None, barrier: ReloadBarrier | None = None,
                 replicas: dict[str, Replicas] | None = None) -> None:
        self._pools = pools
        # The pools' replica regions by model (several endpoints), for Gateway.from_config.
        self.replicas = replicas or {}
        self.index = index  # this worker's index (0 runs a [cluster] host's lease agent)
        self._fd = wake_fd
        self._loop: asyncio.AbstractEventLoop | None = None
        self.key_buckets = key_buckets
        self.board = board
        self._key_fds = key_fds or []
        self.on_keys_changed: Callable[[], None] | None = None
        self.barrier = barrier
        self.on_commit: Callable[[], None] | None = None

    def __getitem__(self, pool: str) -> Admission:
        return self._pools[pool]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pools)

    def __len__(self) -> int:
        return len(self._pools)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Watches this worker's eventfd on `loop` and takes any mail already there."""
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._on_wake)
        if self._key_fds:
            self._loop.add_reader(self._key_fds[self.index], self._on_keys_told)
        if self.barrier is not None:
            self._loop.add_reader(self.barrier.commit_fds[self.index], self._on_commit_told)
        self._deliver()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            if self._key_fds:
                self._loop.remove_reader(self._key_fds[self.index])
            if self.barrier is not None:
                self._loop.remove_reader(self.barrier.commit_fds[self.index])
            self._loop = None

    def keys_changed(self) -> None:
        """Tells every other worker of the host that a key changed."""
        for i, fd in enumerate(self._key_fds):
            if i != self.index:
                os.eventfd_write(fd, 1)

    def _on_keys_told(self) -> None:
        try:
            os.eventfd_read(self._key_fds[self.index])
        except BlockingIOError:
            return
        if self.on_keys_changed is not None:
            self.on_keys_changed()

    def _on_commit_told(self) -> None:
        assert self.barrier is not None
        try:
            os.eventfd_read(self.barrier.commit_fds[self.index])
        except BlockingIOError:
            return
        if self.on_commit is not None:
            self.on_commit()

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass
        self._deliver()

    def _deliver(self) -> None:
        for adm in self._pools.values():
            adm.deliver()


class SnapshotBoard:
    """Every worker's latest `WorkerSnapshot`, one JSON file per worker in the
    supervisor's run directory, replaced atomically (write, then rename).

    A worker publishes every `PUBLISH_INTERVAL_S` and on every scrape it
    answers; the scrape reads the others' files. So a scrape shows this
    worker's numbers as of now and every other worker's as of at most
    `PUBLISH_INTERVAL_S` ago (plus any event-loop stall of that worker).
    """

    def __init__(self, directory: str, index: int, workers: int) -> None:
        self.dir = Path(directory)
        self.index = index
        self.workers = workers

    def _path(self, index: int) -> Path:
        return self.dir / f"worker-{index}.json"

    def publish(self, snap: WorkerSnapshot) -> None:
        tmp = self.dir / f".worker-{self.index}.{os.getpid()}.tmp"
        tmp.write_bytes(snapshot_to_json(snap))
        os.replace(tmp, self._path(self.index))

    def others(self) -> list[WorkerSnapshot]:
        """The other workers' latest snapshots. A worker not yet published is
        missing, and so is one whose process is gone: a killed worker's file
        stays until its replacement publishes, and read as live it made
        /status.json count it and say every worker ran a config its
        replacement had not applied yet."""
        out = []
        for i in range(self.workers):
            if i == self.index:
                continue
            try:
                snap = snapshot_from_json(self._path(i).read_bytes())
            except FileNotFoundError:
                continue
            if _alive(snap.pid):
                out.append(snap)
        return out

    def install(self, app: web.Application, snapshot: Callable[[], WorkerSnapshot]) -> None:
        """Makes `app`'s /metrics and /status.json report the host, and
        publishes `snapshot()` periodically while the app runs."""

        async def collect() -> list[WorkerSnapshot]:
            mine = snapshot()
            self.publish(mine)
            return [mine, *self.others()]

        async def publisher(app: web.Application) -> AsyncIterator[None]:
            async def loop() -> None:
                while True:
                    try:
                        self.publish(snapshot())
                    except OSError as e:  # a full or vanished run dir must not stop serving
                        log.warning("publishing metrics snapshot failed: %s", e)
                    await asyncio.sleep(PUBLISH_INTERVAL_S)

            task = asyncio.create_task(loop())
            yield
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

        app[METRICS_SOURCE] = MetricsSource(collect, shared_admission=True)
        app.cleanup_ctx.append(publisher)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or the pid is another user's now
        return False
    return True


def listen(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """One listening TCP socket, made before forking so every worker accepts on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class _Stop(Exception):
    pass


class Supervisor:
    """Forks `workers` processes running `target(index)`, keeps them running.

    `target` runs in the child and returns its exit status. A worker that
    dies is settled (`shared.reclaim`) and forked again; SIGTERM or SIGINT is
    forwarded to every worker, which are then waited for (SIGKILL after
    `grace_s`); `run()` returns 0.
    """

    def __init__(self, workers: int, target: Callable[[int], int], shared: SharedPools | None = None,
                 grace_s: float = 10.0, on_reload: Callable[[], None] = lambda: None,
                 barrier: ReloadBarrier | None = None) -> None:
        self.workers = workers
        self.target = target
        self.shared = shared
        self.grace_s = grace_s
        self.pids: dict[int, int] = {}
        self.restarts = 0
        # Called on SIGHUP before the workers are told: what a worker forked
        # after it (a replacement) needs to apply the reload too.
        self.on_reload = on_reload
        # Orders the workers' reloads (swap everywhere, then retune); None:
        # each worker retunes as it reloads.
        self.barrier = barrier

    def _fork(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until its loop handles it
                code = self.target(index)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                os._exit(code)
        self.pids[pid] = index

    def run(self) -> int:
        def stop(signum: int, frame: object) -> None:
            raise _Stop

        def reload(signum: int, frame: object) -> None:
            # Each worker re-reads the config and applies it (tierq.lifecycle.reload).
            log.info("supervisor %d: SIGHUP: reloading %d workers", os.getpid(), len(self.pids))
            self.on_reload()
            if self.barrier is not None:
                self.barrier.open(set(self.pids.values()))
            for pid in list(self.pids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)

        old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
        try:
            for i in range(self.workers):
                self._fork(i)
            log.info("supervisor %d: %d workers %s", os.getpid(), self.workers, sorted(self.pids))
            while True:
                pid, status = self._wait()
                if pid == 0:
                    continue
                index = self.pids.pop(pid, None)
                if index is None:
                    continue
                code = os.waitstatus_to_exitcode(status)
                settled = self.shared.reclaim(index) if self.shared else (0, 0)
                log.warning("worker %d (pid %d) exited with %d; reclaimed %d slots, %d waiters; restarting",
                            index, pid, code, *settled)
                self.restarts += 1
                time.sleep(0.05)  # a worker that dies at start must not spin the host
                self._fork(index)
        except _Stop:
            pass
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        self._stop_all()
        return 0

    def _wait(self) -> tuple[int, int]:
        """The next worker to exit, taking reload reports meanwhile; (0, 0) if
        none exited within a tenth of a second."""
        if self.barrier is None:
            return os.waitpid(-1, 0)
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            ready, _, _ = select.select([self.barrier], [], [], 0.1)
            if ready:
                self.barrier.read_reports()
        return pid, status

    def _stop_all(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.grace_s
        while self.pids:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                if time.monotonic() > deadline:
                    for p in self.pids:
                        os.kill(p, signal.SIGKILL)
                    deadline = float("inf")
                time.sleep(0.01)
                continue
            index = self.pids.pop(pid, None)
            if index is not None and self.shared:
                self.shared.reclaim(index)
