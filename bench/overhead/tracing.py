"""What tracing costs ([tracing], #22 item 1): throughput at saturation and gateway
CPU per request with tracing off, on at the default sample_ratio 0.01, and on at
sample_ratio 1.0 (every request's three spans built and sent), each a `tierq serve`
with every other feature on (the overhead bench's configuration), against the same
nginx static backend, interleaved in rounds; the spans go to an OTLP/HTTP receiver
on loopback (otlp_sink.py) that decodes them and counts what arrived.

Writes bench/results/<name>.md and the raw samples, <name>.json.gz.

    python bench/overhead/tracing.py [--rounds 5] [--secs 4] [--conns 16]
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

# name -> the [tracing] table added to the overhead bench's config ("" for none).
VARIANTS: dict[str, str] = {
    "tracing off": "",
    "tracing on, sample_ratio 0.01 (the default)": "sample_ratio = 0.01",
    "tracing on, sample_ratio 1.0": "sample_ratio = 1.0",
}
BASELINE = "tracing off"


def variant_config(base: Path, i: int, tracing: str, sink: str) -> Path:
    text = base.read_text().replace("overhead-ledger.db", f"tracing-ledger-{i}.db")
    if tracing:
        text += f'\n[tracing]\notlp_endpoint = "{sink}"\nservice_name = "bench-{i}"\n{tracing}\n'
    cfg = h.TMP / f"tracing-{i}.toml"
    cfg.write_text(text)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--secs", type=float, default=4.0)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--name", default="tracing")
    args = ap.parse_args()
    h.build_loadgen()
    procs: list[h.Proc] = []
    targets: dict[str, dict[str, Any]] = {}
    try:
        be, static_root = static_backend()
        procs.append(be)
        sink_port = h.free_port()
        sink = h.Proc("otlp-sink", [h.PY, str(HERE / "otlp_sink.py"), str(sink_port)], sink_port,
                      health="/count")
        procs.append(sink)
        sink.wait_ready()
        sink_url = f"http://127.0.0.1:{sink_port}"
        base, token = tierq_config(static_root, static_root)
        for i, (name, tracing) in enumerate(VARIANTS.items()):
            cfg = variant_config(base, i, tracing, sink_url)
            port = h.free_port()
            p = h.Proc(f"tracing-{i}", [h.PY, "-m", "tierq", "serve", "--config", str(cfg),
                                        "--host", "127.0.0.1", "--port", str(port)],
                       port, cwd=h.TMP, health="/healthz")
            procs.append(p)
            p.wait_ready()
            targets[name] = {"url": f"http://127.0.0.1:{port}", "pid": p.pid,
                             "headers": [["authorization", f"Bearer {token}"]]}

        res: dict[str, dict[str, list[float]]] = {n: {"rps": [], "cpu_us": [], "p50_ms": [],
                                                      "p99_ms": []} for n in targets}
        answered = {n: 0 for n in targets}
        names = list(targets)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                t = targets[n]
                recs, _ = gen(t["url"] + PATH, "static-chat", t["headers"], mode="closed",
                              concurrency=args.conns, duration_s=min(0.5, args.secs), grace_s=10)
                answered[n] += len(recs)  # warm-up requests are traced too
                cpu0 = h.cpu_seconds(t["pid"])
                recs, _ = gen(t["url"] + PATH, "static-chat", t["headers"], mode="closed",
                              concurrency=args.conns, duration_s=args.secs, grace_s=10)
                cpu = h.cpu_seconds(t["pid"]) - cpu0
                answered[n] += len(recs)
                good = ok(recs)
                if not good:
                    raise RuntimeError(f"{n}: no request answered 200")
                lat = [a["total"] for a in good]
                res[n]["rps"].append(len(good) / args.secs)
                res[n]["cpu_us"].append(cpu / len(good) * 1e6)
                res[n]["p50_ms"].append(h.pct(lat, 50))
                res[n]["p99_ms"].append(h.pct(lat, 99))
                h.log(f"round {r + 1} {n}: {len(good) / args.secs:.0f} req/s, "
                      f"{cpu / len(good) * 1e6:.0f} us CPU/request")
        # Each gateway sends what it still holds within a second (or at shutdown).
        for p in procs[2:]:
            p.stop()
        got = h.get_json(sink_url + "/count")
    finally:
        h.stop_all(procs)

    base_rps = statistics.median(res[BASELINE]["rps"])
    base_cpu = statistics.median(res[BASELINE]["cpu_us"])
    rows = []
    for i, n in enumerate(names):
        sent = got.get(f"bench-{i}", {"spans": 0, "requests": 0})
        rps, cpu = statistics.median(res[n]["rps"]), statistics.median(res[n]["cpu_us"])
        ratios = [a / b for a, b in zip(res[n]["rps"], res[BASELINE]["rps"])]
        rows.append([n, f"{rps:,.0f}", f"{rps / base_rps:.3f}",
                     f"{min(ratios):.3f} to {max(ratios):.3f}", f"{cpu:,.0f}",
                     f"{cpu - base_cpu:+,.1f}",
                     f"{statistics.median(res[n]['p50_ms']):.2f} / "
                     f"{statistics.median(res[n]['p99_ms']):.2f}",
                     f"{sent['requests']:,} of {answered[n]:,} ({sent['spans']:,} spans)"
                     if VARIANTS[n] else "-"])
    md = (f"# What tracing costs\n\n{h.machine_line()}\n\n"
          f"nginx static backend, every other feature on (API keys, ledger, access log, "
          f"metrics), {args.conns} closed-loop connections, {args.secs:g} s per measurement, "
          f"median of {args.rounds} interleaved rounds (the order reversed every other "
          "round). CPU is the gateway process's user+sys time per answered request, the "
          "exporter thread included. Traced: the requests (and spans) the OTLP/HTTP receiver "
          "(loopback, its own process) decoded, of the requests sent, warm-ups included.\n\n"
          + h.md_table(["path", "req/s", "x tracing off", "per-round ratio", "CPU us/request",
                        "vs off", "p50 / p99 ms", "traced"], rows))
    h.RESULTS.mkdir(parents=True, exist_ok=True)
    (h.RESULTS / f"{args.name}.md").write_text(md)
    h.save_raw(args.name, {"args": vars(args), "results": res, "sink": got,
                           "answered": answered})
    print(md)


if __name__ == "__main__":
    main()
