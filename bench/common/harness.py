"""Shared plumbing for the load scenarios: servers as child processes on loopback
ports, the Rust load generator (bench/common/loadgen), percentiles and Markdown.

Every child is started by us, remembered by pid and stopped by that pid; every
load run is bounded in time by the generator itself (duration + grace).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
RESULTS = Path(os.environ.get("BENCH_RESULTS", BENCH / "results"))
LOADGEN_DIR = BENCH / "common" / "loadgen"
LOADGEN = LOADGEN_DIR / "target" / "release" / "tierq-loadgen"
PY = os.environ.get("PY", sys.executable)
TMP = Path(tempfile.mkdtemp(prefix="tierq-bench-"))


def save_raw(name: str, obj: Any) -> Path:
    """RESULTS/<name>.json.gz: a run's raw samples, compact JSON, gzipped (mtime 0,
    so the same numbers make the same bytes). The <name>.md beside it is the summary
    git keeps readable; `load_raw` reads it back for the reports."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json.gz"
    data = json.dumps(obj, separators=(",", ":"), default=str).encode()
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as z:
        z.write(data)
    return path


def load_raw(name: str) -> Any:
    """What `save_raw(name, ...)` wrote."""
    return json.loads(gzip.decompress((RESULTS / f"{name}.json.gz").read_bytes()))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_loadgen() -> Path:
    if not LOADGEN.exists() or any(
        p.stat().st_mtime > LOADGEN.stat().st_mtime
        for p in [LOADGEN_DIR / "Cargo.toml", *(LOADGEN_DIR / "src").glob("*.rs")]
    ):
        log("building bench/common/loadgen (cargo build --release)")
        subprocess.run(
            ["cargo", "build", "--release", "--quiet"], cwd=LOADGEN_DIR, check=True
        )
    return LOADGEN


class Proc:
    """A child server we started; stopped by its own pid (and its process group)."""

    def __init__(self, name: str, argv: Sequence[str], port: int, env: dict[str, str] | None = None,
                 cwd: Path | None = None, health: str = "/") -> None:
        self.name = name
        self.port = port
        self.logfile = TMP / f"{name}.log"
        self.argv = list(argv)
        full_env = {**os.environ, **(env or {})}
        self.p = subprocess.Popen(
            self.argv, stdout=self.logfile.open("wb"), stderr=subprocess.STDOUT,
            env=full_env, cwd=cwd, start_new_session=True,
        )
        self.health = health

    def wait_ready(self, timeout: float = 60.0, path: str | None = None,
                   method: str = "GET", body: bytes | None = None) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}{path or self.health}"
        last = ""
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.p.returncode}): {self.tail()}")
            try:
                req = urllib.request.Request(url, data=body, method=method,
                                             headers={"content-type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status < 500:
                        return
            except urllib.error.HTTPError as e:  # an answer at all means it listens
                if e.code < 500:
                    return
                last = str(e)
            except OSError as e:
                last = str(e)
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready on :{self.port} after {timeout}s ({last}): "
                           f"{self.tail()}")

    def tail(self, n: int = 2000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)

    @property
    def pid(self) -> int:
        return self.p.pid


def start_sim(name: str, slots: int, ttft_ms: float, tokens_per_s: float,
              *extra: str) -> Proc:
    """`tierq sim` as a child process on a free port; `extra` are more of its flags
    (e.g. "--scheduling", "priority", "--no-metrics")."""
    port = free_port()
    p = Proc(name, [PY, "-m", "tierq", "sim", "--host", "127.0.0.1", "--port", str(port),
                    "--slots", str(slots), "--ttft-ms", str(ttft_ms),
                    "--tokens-per-s", str(tokens_per_s), *extra],
             port, cwd=TMP, health="/sim/stats")
    p.wait_ready()
    return p


def start_gateway(name: str, cfg: Path, workers: int = 1) -> Proc:
    """`tierq serve --config cfg` as a child process on a free port, ready."""
    port = free_port()
    p = Proc(name, [PY, "-m", "tierq", "serve", "--config", str(cfg), "--host", "127.0.0.1",
                    "--port", str(port), "--workers", str(workers)],
             port, cwd=TMP, health="/healthz")
    try:
        p.wait_ready()
    except Exception:
        p.stop()
        raise
    return p


def sim_running(stats: dict[str, Any]) -> int:
    """Sequences the sim is running (`running`; `generating` in older sims)."""
    return int(stats.get("running", stats.get("generating", 0)))


def drain_sim(root: str, timeout: float = 30.0) -> bool:
    """Waits (bounded) until the sim holds no request; True if it emptied."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get_json(root + "/sim/stats")["in_flight"] == 0:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


class Sampler:
    """Calls `probe` every `every` seconds on a thread while a run is going and keeps
    (seconds since start, what it returned); a probe that raises OSError (a slow or
    busy server) or returns None leaves no sample. `t0` is time.monotonic() at start."""

    def __init__(self, probe: Callable[[], Any], every: float = 0.1) -> None:
        self.probe, self.every = probe, every
        self.samples: list[tuple[float, Any]] = []
        self.t0 = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                v = self.probe()
            except OSError:
                continue
            if v is not None:
                self.samples.append((time.monotonic() - self.t0, v))

    def __enter__(self) -> Sampler:
        self.t0 = time.monotonic()
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants (nginx's worker), s."""
    procs: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                procs[int(d.name)] = int(_stat(int(d.name))[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        for c, pp in procs.items():
            if pp == p and c not in tree:
                tree.add(c)
                todo.append(c)
    total = 0
    for p in tree:
        try:
            total += sum(int(x) for x in _stat(p)[11:13])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def pyspy_start(pid: int, seconds: int, raw: Path, mode: str = "") -> subprocess.Popen[bytes] | None:
    """py-spy recording `pid`. mode "gil": only samples of the thread holding the GIL
    (where the one core a Python process can use goes); "native": C and Rust frames
    too (py-spy then pauses the process at each sample, so it runs a little slower)."""
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        log("py-spy not installed: no profile")
        return None
    how = {"": ["--nonblocking"], "gil": ["--gil", "--nonblocking"], "native": ["--native"]}[mode]
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(seconds),
                             "--format", "raw", "--rate", "200", *how, "-o", str(raw)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pyspy_summary(raw: Path, title: str, out: Path) -> str | None:
    """Top functions by own time and tierq functions by inclusive time, as text."""
    if not raw.exists():
        return None
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
    if not total:
        return None
    lines = [f"py-spy: {title}; {total} samples at 200 Hz (idle included)\n", "\nTop by own time:\n"]
    for f, c in sorted(own.items(), key=lambda x: -x[1])[:30]:
        lines.append(f"{100*c/total:5.1f}%  {f}\n")
    lines.append("\nTop tierq/aiohttp functions by inclusive time:\n")
    for f, c in sorted(((f, c) for f, c in incl.items() if "tierq" in f or "aiohttp" in f),
                       key=lambda x: -x[1])[:30]:
        lines.append(f"{100*c/total:5.1f}%  {f}\n")
    # Where the time goes by layer: each sample counted once, by the first of
    # these its stack (from the leaf up) reaches.
    layers = (("tierq core (Rust)", ("_core.", "tierq::", "(core/")),
              ("tierq (Python)", ("(tierq/",)),
              ("aiohttp/multidict/yarl", ("(aiohttp/", "aiohttp/_", "_http_", "multidict", "yarl",
                                          "propcache", "frozenlist")),
              ("asyncio/uvloop", ("(asyncio/", "uvloop", "(loop.c", "_asynciomodule")),
              ("orjson", ("orjson",)),
              ("logging", ("(logging/",)),
              ("sqlite", ("sqlite",)),
              ("decimal", ("_decimal", "(decimal")))
    by_layer: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")[::-1]
        layer = next((name for f in frames for name, keys in layers if any(k in f for k in keys)),
                     "other (interpreter, libc, kernel)")
        by_layer[layer] = by_layer.get(layer, 0) + int(count)
    lines.append("\nBy layer (a sample goes to the innermost frame's layer):\n")
    for name, c in sorted(by_layer.items(), key=lambda x: -x[1]):
        lines.append(f"{100*c/total:5.1f}%  {name}\n")
    out.write_text("".join(lines))
    return out.name


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post(url: str, body: Any = None) -> Any:
    """POST (a JSON body if given); returns the decoded JSON answer, or None."""
    data = b"" if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        raw = r.read()
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def loadgen(spec: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the generator once; returns its per-request records and its summary."""
    out = TMP / f"records-{time.monotonic_ns()}.jsonl"
    spec = {**spec, "out": str(out)}
    bound = float(spec["duration_s"]) + float(spec.get("grace_s", 30.0)) + 30.0
    r = subprocess.run([str(LOADGEN), json.dumps(spec)], capture_output=True, text=True,
                       timeout=bound)
    if r.returncode != 0:
        raise RuntimeError(f"loadgen failed: {r.stderr[-2000:]}")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    recs = [json.loads(line) for line in out.read_text().splitlines() if line]
    out.unlink()
    return recs, summary


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return float(s[k])


def fmt(x: float | int | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, int):
        return str(x)
    return f"{x:,.{digits}f}"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines) + "\n"


def machine_line() -> str:
    load = os.getloadavg()
    return (f"{os.cpu_count()} cores, load average {load[0]:.2f} at start, "
            f"Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def need(cmd: str) -> str:
    path = shutil.which(cmd)
    if path is None:
        raise SystemExit(f"{cmd} not found: run the scenario's run.sh/smoke.sh, which installs it")
    return path


def stop_all(procs: Iterable[Proc]) -> None:
    for p in procs:
        try:
            p.stop()
        except Exception as e:  # keep stopping the others
            log(f"stopping {p.name}: {e}")
