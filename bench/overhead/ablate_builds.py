"""Two builds of tierq, each with every feature on and with the ledger replaced by
a no-op (ablate_serve.py), beside the bare forwarder, against the same nginx static
backend, interleaved in rounds: what the ledger costs in one build against the
other, measured in the same run. Each build is a source tree with its own venv
(`TREE/.venv/bin/python`, `TREE/bench/overhead/ablate_serve.py`).

CPU per request is the gateway process's (all threads) and its event-loop
thread's alone (/proc/PID/task/PID/stat). Writes bench/results/<name>.md and the raw samples, <name>.json.gz.

    python bench/overhead/ablate_builds.py OLD_TREE NEW_TREE [--rounds 5] [--conns 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "common"))
sys.path.insert(0, str(HERE))
import harness as h  # noqa: E402
from run import PATH, gen, ok, static_backend, tierq_config  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def loop_cpu(pid: int) -> float:
    """CPU seconds of a process's main thread (the event loop's)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs=2, type=Path, help="old and new source trees, each with .venv")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--secs", type=float, default=4.0)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--lat-s", type=float, default=3.0, help="seconds at 1 concurrent request")
    ap.add_argument("--name", default="ledger-ablation")
    ap.add_argument("--title", default="The ledger's cost, two builds in one run")
    args = ap.parse_args()
    h.build_loadgen()
    procs: list[h.Proc] = []
    targets: dict[str, dict[str, Any]] = {}
    try:
        be, static_root = static_backend()
        procs.append(be)
        base, token = tierq_config(static_root, static_root)
        for build, tree in zip(("old", "new"), args.trees):
            for name, off in (("every feature on", "none"), ("ledger a no-op", "ledger")):
                port = h.free_port()
                p = h.Proc(f"builds-{build}-{off}",
                           [str(tree / ".venv/bin/python"), str(tree / "bench/overhead/ablate_serve.py"),
                            off, "--", "--config", str(base), "--host", "127.0.0.1", "--port", str(port)],
                           port, cwd=h.TMP, health="/healthz")
                procs.append(p)
                p.wait_ready()
                targets[f"{build}: {name}"] = {"url": f"http://127.0.0.1:{port}", "pid": p.pid,
                                               "headers": [["authorization", f"Bearer {token}"]]}
        port = h.free_port()
        fw = h.Proc("builds-forwarder", [h.PY, str(HERE / "forwarder.py"), static_root, str(port)], port)
        procs.append(fw)
        fw.wait_ready(path="/v1/models")
        targets["bare forwarder"] = {"url": f"http://127.0.0.1:{port}", "pid": fw.pid, "headers": []}
        res: dict[str, dict[str, list[float]]] = {
            n: {"rps": [], "cpu_us": [], "loop_us": [], "c1_ms": []} for n in targets}
        names = list(targets)
        for r in range(args.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                t = targets[n]
                gen(t["url"] + PATH, "static-chat", t["headers"], mode="closed",
                    concurrency=args.conns, duration_s=min(0.5, args.secs), grace_s=10)  # warm
                cpu0, loop0 = h.cpu_seconds(t["pid"]), loop_cpu(t["pid"])
                recs, _ = gen(t["url"] + PATH, "static-chat", t["headers"], mode="closed",
                              concurrency=args.conns, duration_s=args.secs, grace_s=10)
                cpu, loop = h.cpu_seconds(t["pid"]) - cpu0, loop_cpu(t["pid"]) - loop0
                good = len(ok(recs))
                if good == 0:
                    raise RuntimeError(f"{n}: no request answered 200")
                res[n]["rps"].append(good / args.secs)
                res[n]["cpu_us"].append(cpu / good * 1e6)
                res[n]["loop_us"].append(loop / good * 1e6)
                recs, _ = gen(t["url"] + PATH, "static-chat", t["headers"], mode="closed",
                              concurrency=1, duration_s=args.lat_s, grace_s=10)
                res[n]["c1_ms"] += [a["total"] for a in ok(recs)]
                h.log(f"round {r + 1} {n}: {good / args.secs:.0f} req/s, {cpu / good * 1e6:.0f} us CPU/req")
    finally:
        h.stop_all(procs)

    def med(n: str, k: str) -> float:
        return statistics.median(res[n][k])

    rows = []
    for n in names:
        spread = f"{min(res[n]['cpu_us']):.0f} to {max(res[n]['cpu_us']):.0f}"
        rows.append([n, f"{med(n, 'rps'):,.0f}", f"{med(n, 'cpu_us'):,.0f} ({spread})",
                     f"{med(n, 'loop_us'):,.0f}",
                     f"{h.pct(res[n]['c1_ms'], 50):.3f} / {h.pct(res[n]['c1_ms'], 99):.3f}"])
    share = []
    for build in ("old", "new"):
        on, off = f"{build}: every feature on", f"{build}: ledger a no-op"
        share.append([build, f"{med(on, 'cpu_us') - med(off, 'cpu_us'):+,.0f}",
                      f"{med(on, 'loop_us') - med(off, 'loop_us'):+,.0f}",
                      f"{(h.pct(res[on]['c1_ms'], 50) - h.pct(res[off]['c1_ms'], 50)) * 1000:+,.0f}"])
    trees = "\n".join(f"- {b}: `{t}`" for b, t in zip(("old", "new"), args.trees))
    md = (f"# {args.title}\n\n{h.machine_line()}\n\n{trees}\n\n"
          f"nginx static backend, {args.conns} closed-loop connections, {args.secs:g} s per "
          f"measurement, median of {args.rounds} interleaved rounds (CPU: min to max in "
          f"brackets). Latency: one request at a time for {args.lat_s:g} s per round, "
          "client-side total, rounds pooled.\n\n"
          + h.md_table(["path", "req/s", "CPU us/request", "loop-thread CPU us/request",
                        "1 concurrent p50 / p99 ms"], rows)
          + "\n\nThe ledger's share (every feature on minus the ledger a no-op, same build):\n\n"
          + h.md_table(["build", "CPU us/request", "loop-thread CPU us/request", "1 concurrent p50, us"],
                       share))
    h.RESULTS.mkdir(parents=True, exist_ok=True)
    (h.RESULTS / f"{args.name}.md").write_text(md)
    h.save_raw(args.name, {"args": {**vars(args), "trees": [str(t) for t in args.trees]},
                           "results": res})
    print(md)


if __name__ == "__main__":
    main()
