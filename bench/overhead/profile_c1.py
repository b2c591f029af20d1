"""Where one request at a time spends its wall time: tierq (every feature on, as in
run.py) on each upstream client (`tierq`: aiohttp, `tierq-core`: the core's) and the
bare forwarder, each driven by one closed-loop connection against
the nginx static backend while py-spy --native records every thread with idle
included. Summarised per path into bench/results/<name>-<path>.txt: the main
(event-loop) thread's samples split into waiting in epoll (nothing to do: the
request is at the backend, or its bill at the ledger's writer) and running, and
the top own-time frames of the loop thread.

    python bench/overhead/profile_c1.py [--secs 6] [--name overhead-c1-pyspy]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "common"))
sys.path.insert(0, str(HERE))
import harness as h  # noqa: E402
from run import PATH, TIERQ_CLIENTS, gen, ok, static_backend, tierq_config  # noqa: E402


def summarise(raw: Path, title: str, rps: float, p50_ms: float, out: Path) -> str:
    total = main = idle = 0
    own: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        if not any("Runner.run" in f or "run_until_complete" in f or "uvloop" in f.lower()
                   for f in frames):
            continue  # another thread (the ledger's writer, the access-log writer)
        main += n
        if any("epoll_wait" in f or "epoll_pwait" in f for f in frames[-4:]):
            idle += n
            continue
        own[frames[-1]] += n
    busy = main - idle
    lines = [f"py-spy --native, idle included: {title}\n",
             f"{rps:.0f} requests/s at 1 concurrent, p50 {p50_ms:.3f} ms\n",
             f"event-loop thread: {main} samples; waiting in epoll {idle} "
             f"({100 * idle / max(main, 1):.1f}%), running {busy} ({100 * busy / max(main, 1):.1f}%)\n",
             f"so per request: {busy / max(main, 1) * 1e6 / max(rps, 1):.0f} us running and "
             f"{idle / max(main, 1) * 1e6 / max(rps, 1):.0f} us waiting\n",
             "\nTop by own time while running (share of the loop thread's samples):\n"]
    for f, c in own.most_common(30):
        lines.append(f"{100 * c / max(main, 1):5.1f}%  {f}\n")
    out.write_text("".join(lines))
    return out.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--secs", type=int, default=6)
    ap.add_argument("--name", default="overhead-c1-pyspy")
    args = ap.parse_args()
    h.build_loadgen()
    procs: list[h.Proc] = []
    try:
        be, static_root = static_backend()
        procs.append(be)
        paths: dict[str, tuple[str, int, list[list[str]]]] = {}
        for n, client in TIERQ_CLIENTS.items():
            cfg, token = tierq_config(static_root, static_root, client)
            port = h.free_port()
            gw = h.Proc(f"c1-{n}", [h.PY, "-m", "tierq", "serve", "--config", str(cfg), "--host",
                                    "127.0.0.1", "--port", str(port)], port, cwd=h.TMP, health="/healthz")
            procs.append(gw)
            gw.wait_ready()
            paths[n] = (f"http://127.0.0.1:{port}", gw.pid, [["authorization", f"Bearer {token}"]])
        fport = h.free_port()
        fw = h.Proc("c1-forwarder", [h.PY, str(HERE / "forwarder.py"), static_root, str(fport)], fport)
        procs.append(fw)
        fw.wait_ready(path="/v1/models")
        paths["forwarder"] = (f"http://127.0.0.1:{fport}", fw.pid, [])
        for name, (root, pid, headers) in paths.items():
            gen(root + PATH, "static-chat", headers, mode="closed", concurrency=4, duration_s=1.0, grace_s=10)
            raw = h.TMP / f"c1-{name}.raw"
            spy = h.pyspy_start(pid, args.secs, raw, "native")
            if spy is None:
                return
            recs, summ = gen(root + PATH, "static-chat", headers, mode="closed", concurrency=1,
                             duration_s=args.secs + 1, grace_s=10)
            spy.wait(60)
            good = ok(recs)
            rps = len(good) / summ["elapsed_s"]
            file = summarise(raw, f"{name}, one request at a time (static backend)", rps,
                             h.pct([a["total"] for a in good], 50), h.RESULTS / f"{args.name}-{name}.txt")
            h.log(f"{name}: {rps:.0f} req/s -> {file}")
    finally:
        h.stop_all(reversed(procs))


if __name__ == "__main__":
    main()
