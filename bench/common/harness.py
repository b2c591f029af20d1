"""Shared plumbing for the load scenarios: servers as child processes on loopback
ports, the Rust load generator (bench/common/loadgen), percentiles and Markdown.

Every child is started by us, remembered by pid and stopped by that pid; every
load run is bounded in time by the generator itself (duration + grace).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
RESULTS = Path(os.environ.get("BENCH_RESULTS", BENCH / "results"))
LOADGEN_DIR = BENCH / "common" / "loadgen"
LOADGEN = LOADGEN_DIR / "target" / "release" / "tierq-loadgen"
PY = os.environ.get("PY", sys.executable)
TMP = Path(tempfile.mkdtemp(prefix="tierq-bench-"))


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


def start_sim(name: str, slots: int, ttft_ms: float, tokens_per_s: float) -> Proc:
    port = free_port()
    code = ("import sys; from tierq.sim import run_sim; "
            "run_sim(host='127.0.0.1', port=int(sys.argv[1]), slots=int(sys.argv[2]), "
            "ttft_ms=float(sys.argv[3]), tokens_per_s=float(sys.argv[4]))")
    p = Proc(name, [PY, "-c", code, str(port), str(slots), str(ttft_ms), str(tokens_per_s)],
             port, health="/sim/stats")
    p.wait_ready()
    return p


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


def pyspy_start(pid: int, seconds: int, raw: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        log("py-spy not installed: no profile")
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(seconds),
                             "--format", "raw", "--rate", "200", "--nonblocking", "-o", str(raw)],
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
    out.write_text("".join(lines))
    return out.name


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post(url: str) -> None:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=5):
        pass


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
