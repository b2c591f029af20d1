"""What each tierq feature costs: gateway CPU per request and throughput at saturation
for tierq with every feature on, then with one feature off at a time (the access log
and API keys through tierq's own switches; the ledger and metrics replaced by no-ops,
as an experiment: bench/overhead/ablate_serve.py), beside the bare forwarder, all
against the same nginx static backend and interleaved in rounds.

CPU per request (the gateway process's user+sys seconds over requests answered) is
the steadier figure on a shared machine; throughput is reported beside it. Writes
bench/results/<name>.md and the raw samples, <name>.json.gz.

    python bench/overhead/ablate.py [--rounds 3] [--secs 4] [--conns 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "common"))
sys.path.insert(0, str(HERE))
import harness as h  # noqa: E402
from run import PATH, gen, ok, static_backend, tierq_config  # noqa: E402

# name -> (parts replaced by no-ops (ablate_serve.py), extra `tierq serve` flags,
# config edit). "every feature on" is the overhead bench's configuration.
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "every feature on": ("none", [], ""),
    "without the access log": ("none", ["--no-access-log"], ""),
    "without API keys (loopback mode)": ("none", [], "keys"),
    "ledger a no-op (experiment)": ("ledger", [], ""),
    "metrics a no-op (experiment)": ("metrics", [], ""),
    "all four off (experiment)": ("ledger,metrics", ["--no-access-log"], "keys"),
}


def variant_config(base: Path, name: str, drop: str) -> Path:
    text = base.read_text()
    if drop == "keys":
        start = text.index("[keys]")
        end = text.index("[[upstreams]]")
        text = text[:start] + text[end:]
    cfg = h.TMP / f"ablate-{abs(hash(name))}.toml"
    cfg.write_text(text)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=float, default=4.0)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--lat-s", type=float, default=2.0, help="seconds at 1 concurrent request")
    ap.add_argument("--name", default="overhead-ablation")
    args = ap.parse_args()
    h.build_loadgen()
    procs: list[h.Proc] = []
    targets: dict[str, dict[str, Any]] = {}
    try:
        be, static_root = static_backend()
        procs.append(be)
        base, token = tierq_config(static_root, static_root)
        for name, (off, flags, drop) in VARIANTS.items():
            cfg = variant_config(base, name, drop)
            port = h.free_port()
            p = h.Proc(f"ablate-{len(targets)}", [h.PY, str(HERE / "ablate_serve.py"), off, "--",
                                                  "--config", str(cfg), "--host", "127.0.0.1",
                                                  "--port", str(port), *flags],
                       port, cwd=h.TMP, health="/healthz")
            procs.append(p)
            p.wait_ready()
            headers = [] if drop == "keys" else [["authorization", f"Bearer {token}"]]
            targets[f"tierq, {name}"] = {"url": f"http://127.0.0.1:{port}", "pid": p.pid,
                                         "headers": headers}
        port = h.free_port()
        fw = h.Proc("ablate-forwarder", [h.PY, str(HERE / "forwarder.py"), static_root, str(port)], port)
        procs.append(fw)
        fw.wait_ready(path="/v1/models")
        targets["bare forwarder"] = {"url": f"http://127.0.0.1:{port}", "pid": fw.pid, "headers": []}

        res: dict[str, dict[str, list[float]]] = {n: {"rps": [], "cpu_us": [], "c1_ms": []}
                                                  for n in targets}
        names = list(targets)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                t = targets[n]
                gen(t["url"] + PATH, "static-chat", t["headers"], mode="closed",
                    concurrency=args.conns, duration_s=min(0.5, args.secs), grace_s=10)  # warm
                cpu0 = h.cpu_seconds(t["pid"])
                recs, summary = gen(t["url"] + PATH, "static-chat", t["headers"], mode="closed",
                                    concurrency=args.conns, duration_s=args.secs, grace_s=10)
                cpu = h.cpu_seconds(t["pid"]) - cpu0
                good = len(ok(recs))
                if good == 0:
                    raise RuntimeError(f"{n}: no request answered 200")
                res[n]["rps"].append(good / args.secs)
                res[n]["cpu_us"].append(cpu / good * 1e6)
                # One request at a time: the latency each part adds when nothing batches.
                recs, _ = gen(t["url"] + PATH, "static-chat", t["headers"], mode="closed",
                              concurrency=1, duration_s=args.lat_s, grace_s=10)
                res[n]["c1_ms"] += [a["total"] for a in ok(recs)]
                h.log(f"round {r + 1} {n}: {good / args.secs:.0f} req/s, "
                      f"{cpu / good * 1e6:.0f} us CPU/request")
    finally:
        h.stop_all(procs)

    fw_cpu = statistics.median(res["bare forwarder"]["cpu_us"])
    fw_rps = statistics.median(res["bare forwarder"]["rps"])
    fw_c1 = h.pct(res["bare forwarder"]["c1_ms"], 50)
    rows = []
    for n in names:
        cpu, rps = statistics.median(res[n]["cpu_us"]), statistics.median(res[n]["rps"])
        c1, c1_99 = h.pct(res[n]["c1_ms"], 50), h.pct(res[n]["c1_ms"], 99)
        rows.append([n, f"{rps:,.0f}", f"{rps / fw_rps:.2f}", f"{cpu:,.0f}", f"{cpu - fw_cpu:+,.0f}",
                     f"{c1:.3f} / {c1_99:.3f}", f"{(c1 - fw_c1) * 1000:+,.0f}"])
    md = (f"# What each tierq feature costs\n\n{h.machine_line()}\n\n"
          f"nginx static backend, {args.conns} closed-loop connections, {args.secs:g} s per "
          f"measurement, median of {args.rounds} interleaved rounds. CPU is the gateway "
          "process's user+sys time per answered request (writer thread included). Latency: "
          f"one request at a time for {args.lat_s:g} s per round, client-side total, all rounds "
          "pooled.\n\n"
          + h.md_table(["path", "req/s", "x forwarder", "CPU us/request", "vs forwarder",
                        "1 concurrent p50 / p99 ms", "p50 vs forwarder, us"], rows))
    h.RESULTS.mkdir(parents=True, exist_ok=True)
    (h.RESULTS / f"{args.name}.md").write_text(md)
    h.save_raw(args.name, {"args": vars(args), "results": res})
    print(md)


if __name__ == "__main__":
    main()
