"""Turns bench/results/<name>.json from run.py into <name>.md (tables, ratios,
targets) and <name>.png. `python bench/overhead/report.py [name]` re-renders."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))
import harness as h  # noqa: E402

fmt = h.fmt
LABEL = {"direct": "direct (no proxy)", "tierq": "tierq (every feature on), aiohttp upstream client",
         "tierq-core": "tierq (every feature on), core upstream client",
         "forwarder": "bare aiohttp+uvloop forwarder", "nginx": "nginx reverse proxy",
         "litellm": "LiteLLM proxy"}


def _med(v: list[float]) -> float:
    return statistics.median(v) if v else math.nan


def _ratio(a: float, b: float) -> str:
    return "–" if not b or math.isnan(a) or math.isnan(b) else f"{a / b:.2f}x"


def _cores(res: dict[str, Any], n: str, phase: str) -> str:
    v = res.get("proxy_cores", {}).get(n, {}).get(phase, [])
    return "–" if not v else f"{_med(v):.2f}"


def derived(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    d: dict[str, dict[str, float]] = {}
    c1d, rd = res["c1"]["direct"], res["rate"]["direct"]
    sd = res["streams"].get("direct", {})
    for n in res["targets"]:
        if n not in res["c1"]:
            continue
        s = res["streams"].get(n, {})
        d[n] = {
            "rps": _med(res["sat_rps"][n]),
            "c1_add_p50": res["c1"][n]["p50"] - c1d["p50"],
            "c1_add_p99": res["c1"][n]["p99"] - c1d["p99"],
            "rate_add_p50": res["rate"][n]["p50"] - rd["p50"],
            "rate_add_p99": res["rate"][n]["p99"] - rd["p99"],
            "gap_add_p99": s.get("gap_p99", math.nan) - sd.get("gap_p99", math.nan),
        }
    return d


def cpu_us(res: dict[str, Any], n: str) -> float:
    """The proxy's CPU per answered request at saturation, us: per round, the cores
    it used over the requests per second it answered; the median of rounds."""
    cores = res.get("proxy_cores", {}).get(n, {}).get("sat", [])
    rps = res["sat_rps"].get(n, [])
    per = [c / r * 1e6 for c, r in zip(cores, rps) if r]
    return _med(per)


def targets(res: dict[str, Any], d: dict[str, dict[str, float]]) -> list[tuple[str, str, str]]:
    """Issue #21's targets for each gateway path (tierq on each upstream client), each a
    same-run ratio against the bare forwarder (LiteLLM for the last)."""
    out: list[tuple[str, str, str]] = []
    f, ll = d.get("forwarder"), d.get("litellm")
    gws = [n for n in ("tierq", "tierq-core") if n in d]
    if not gws:
        return [("all tierq targets", "not measured", "tierq was not in this run")]

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    for g in gws:
        t = d[g]
        if f:
            out.append((f"{g}: throughput >= 1.0x the bare forwarder's", verdict(t["rps"] >= f["rps"]),
                        f"{t['rps']:.0f} vs {f['rps']:.0f} req/s ({_ratio(t['rps'], f['rps'])})"))
            tc, fc = cpu_us(res, g), cpu_us(res, "forwarder")
            out.append((f"{g}: CPU per request <= 1.0x the forwarder's", verdict(tc <= fc),
                        f"{tc:.0f} vs {fc:.0f} us ({_ratio(tc, fc)})"))
            for q, bound in (("p50", 1.0), ("p99", 1.2)):
                a, b = t[f"c1_add_{q}"], f[f"c1_add_{q}"]
                out.append((f"{g}: {q} added latency at 1 concurrent <= {bound:g}x the forwarder's",
                            verdict(a <= bound * b), f"{a:.3f} vs {b:.3f} ms ({_ratio(a, b)})"))
        s = res["streams"].get(g)
        if s:
            n = res["args"]["streams"]
            fg = f["gap_add_p99"] if f else math.nan
            out.append((f"{g}: {n} streams x {res['args']['stream_tokens_per_s']:g} tokens/s, added p99 gap "
                        "between chunks <= +5 ms and <= the forwarder's",
                        verdict(s["errors"] == 0 and s["ok"] >= n and t["gap_add_p99"] <= 5.0
                                and not t["gap_add_p99"] > fg),
                        f"+{t['gap_add_p99']:.2f} ms; {s['ok']} streams ok, {s['errors']} failed"
                        + (f" (forwarder +{fg:.2f} ms)" if f else "")))
        if ll:
            out.append((f"{g}: throughput >= 60x LiteLLM's", verdict(t["rps"] >= 60 * ll["rps"]),
                        f"{t['rps']:.0f} vs {ll['rps']:.1f} req/s ({_ratio(t['rps'], ll['rps'])})"))
        else:
            out.append((f"{g}: throughput >= 60x LiteLLM's", "not measured", "LiteLLM was not in this run"))
    return out


def plot(res: dict[str, Any], d: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in res["targets"] if n in d]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    ax.bar(names, [d[n]["rps"] for n in names], color="tab:blue")
    ax.set_yscale("log")
    ax.set_title(f"throughput at saturation ({res['args']['sat_conns']} conns), req/s")
    for i, n in enumerate(names):
        ax.text(i, d[n]["rps"], f"{d[n]['rps']:.0f}", ha="center", va="bottom", fontsize=8)
    ax = axes[1]
    px = [n for n in names if n != "direct"]
    x = range(len(px))
    w = 0.2
    for k, (key, lab) in enumerate((("c1_add_p50", "1 conc p50"), ("c1_add_p99", "1 conc p99"),
                                    ("rate_add_p50", f"{res['args']['rate']:g}/s p50"),
                                    ("rate_add_p99", f"{res['args']['rate']:g}/s p99"))):
        ax.bar([i + (k - 1.5) * w for i in x], [max(d[n][key], 0.01) for n in px], w, label=lab)
    ax.set_xticks(list(x), px)
    ax.set_yscale("log")
    ax.set_title("added latency vs direct, ms")
    ax.legend(fontsize=7)
    ax = axes[2]
    st = res["streams"]
    sn = [n for n in names if n in st]
    ax.bar(sn, [st[n]["gap_p99"] for n in sn], color="tab:orange")
    ax.axhline(1000 / res["args"]["stream_tokens_per_s"], color="gray", ls=":", label="token interval")
    ax.set_title(f"{res['args']['streams']} streams: p99 gap between chunks, ms")
    ax.legend(fontsize=7)
    fig.suptitle("proxy overhead, one worker each, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(res: dict[str, Any], name: str) -> None:
    d = derived(res)
    a = res["args"]
    names = [n for n in res["targets"] if n in d]
    md = [f"# Proxy overhead ({name})\n",
          f"Backend: nginx (1 worker) returning a static OpenAI chat answer; for streams the sim "
          f"({a['stream_tokens']} tokens at {a['stream_tokens_per_s']:g} tokens/s). One worker per proxy. "
          f"{a['rounds']} interleaved rounds; throughput is the median of rounds, latencies pool "
          f"all rounds. Added latency = the path's percentile minus the direct percentile. "
          f"Machine: {res['machine']}"
          + (f"; load average at the end {res['load_end'][0]:.2f} (1 min), {res['load_end'][1]:.2f} (5 min)"
             if res.get("load_end") else "") + ".\n",
          "\n## Non-streaming\n"]
    rows = []
    for n in names:
        rows.append([LABEL[n], fmt(d[n]["rps"], 0),
                     ", ".join(f"{x:.0f}" for x in res["sat_rps"][n]),
                     _ratio(d[n]["rps"], d.get("tierq", {}).get("rps", math.nan)) if n != "tierq" else "1.00x",
                     _ratio(d[n]["rps"], d.get("forwarder", {}).get("rps", math.nan)),
                     fmt(res["c1"][n]["p50"], 3), fmt(res["c1"][n]["p99"], 3),
                     "–" if n == "direct" else fmt(d[n]["c1_add_p50"], 3),
                     "–" if n == "direct" else fmt(d[n]["c1_add_p99"], 3),
                     fmt(res["rate"][n]["p50"], 2), fmt(res["rate"][n]["p99"], 2),
                     "–" if n == "direct" else fmt(d[n]["rate_add_p99"], 2),
                     res["sat_errors"][n], _cores(res, n, "sat"),
                     "–" if n == "direct" else fmt(cpu_us(res, n), 0)])
    md.append(h.md_table(
        ["path", "req/s at saturation", "per round", "vs tierq", "vs forwarder", "1 conc p50 ms", "1 conc p99 ms",
         "added p50 ms", "added p99 ms", f"{a['rate']:g}/s p50 ms", f"{a['rate']:g}/s p99 ms",
         f"{a['rate']:g}/s added p99 ms", "errors", "proxy CPU at saturation, cores",
         "proxy CPU per request, us"], rows))
    if any(res["wrk_rps"].get(n) for n in names):
        md.append("\nCross-check with wrk (1 thread, same connections): " + ", ".join(
            f"{n} {_med(res['wrk_rps'][n]):.0f} req/s" for n in names if res["wrk_rps"].get(n)) + ".\n")
    md.append(f"\nLoad generator ceiling: the direct row is the generator against nginx with no "
              f"proxy ({d['direct']['rps']:.0f} req/s), "
              + (f"{d['direct']['rps'] / max(d[n]['rps'] for n in names if n != 'direct'):.1f}x "
                 "the fastest proxy, so the proxies, not the generator, set their numbers.\n"
                 if len(names) > 1 else "\n"))
    md.append("\n## Streaming\n")
    srows = []
    for n in names:
        s = res["streams"].get(n)
        if not s:
            continue
        srows.append([LABEL[n], s["started"], s["ok"], s["complete"], s["errors"], fmt(s["ttft_p99"], 1),
                      fmt(s["gap_p50"], 2), fmt(s["gap_p99"], 2), fmt(s["gap_max"], 1),
                      "–" if n == "direct" else fmt(d[n]["gap_add_p99"], 2), _cores(res, n, "streams")])
    md.append(h.md_table(["path", "streams started", "ok", "all tokens", "failed", "TTFT p99 ms",
                          "gap p50 ms", "gap p99 ms", "gap max ms", "added p99 gap ms", "proxy CPU, cores"], srows))
    md.append(f"\n{a['streams']} client streams held open at once (closed loop, started over 1 s).\n")
    md.append("\n## Targets\n")
    md.append(h.md_table(["target", "result", "measured"], targets(res, d)))
    prof = res.get("profile")
    if isinstance(prof, str):  # an older run: one profile
        prof = {"tierq": prof}
    if prof:
        md.append("\nProfiles (py-spy, 200 Hz): " + ", ".join(
            f"{label}: [{file}]({file})" for label, file in prof.items()) + ".\n")
    md.append(f"\n![overhead]({name}.png)\n")
    (h.RESULTS / f"{name}.md").write_text("".join(md))
    plot(res, d, h.RESULTS / f"{name}.png")
    h.log(f"wrote {h.RESULTS / (name + '.md')} and {name}.png")


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "overhead"
    write_report(json.loads((h.RESULTS / f"{name}.json").read_text()), name)
