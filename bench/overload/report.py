"""Turns bench/results/<name>.json from run.py into <name>.md (tables, targets) and
<name>.png (priority and default p99 TTFT against offered load, beside the baselines).

`python bench/overload/report.py [name]` re-renders from the JSON without rerunning.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))
import harness as h  # noqa: E402

fmt = h.fmt


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100*x:.1f}%"


def _shed(s: dict[str, Any]) -> str:
    c = s["shed"]
    if not c:
        return "0"
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))


def _ra(s: dict[str, Any]) -> str:
    """Retry-After honesty of one row: retries that got in within 2x of the hint (ratio
    actual/advertised at p50, p90), then retries that came back too early (shed again)."""
    if not s["retried"]:
        return "–"
    out = "–"
    if not math.isnan(s["ra_within_2x"]):
        out = f"{_pct(s['ra_within_2x'])} (p50 {s['ra_ratio_p50']:.2f}"
        out += f", p90 {s['ra_ratio_p90']:.2f})" if "ra_ratio_p90" in s else ")"
    if "retry_shed_again" in s:
        out += f"; shed again {s['retry_shed_again']}/{s['retried']}"
    return out


def _row(cell: dict[str, Any], label: str, s: dict[str, Any]) -> list[Any]:
    busy = cell["busy"]
    return [
        cell["mode"], f"{cell['load']:g}x", f"{cell['share']:.0%}" if cell["mode"] == "tierq" else "–",
        label, s["n"], _pct(s["success"]), _pct(s["success_after_retry"]),
        fmt(s["ttft_p50"], 0), fmt(s["ttft_p99"], 0), fmt(s.get("queue_p99"), 0), fmt(s["total_p50"], 0), fmt(s["total_p99"], 0),
        _shed(s), f"{s['retry_got_in']}/{s['retried']}",
        _ra(s),
        _pct(busy["busy_mean"]) if busy["busy_mean"] is not None else "no wait",
    ]


HEAD = ["path", "load", "priority share", "tier", "n", "ok", "ok incl. retry", "TTFT p50 ms",
        "TTFT p99 ms", "queue p99 ms", "total p50 ms", "total p99 ms", "sheds (429) by code",
        "retries that got in", "retries: actual wait within 2x of retry-after-ms (actual/advertised); shed again",
        "sim busy while any wait"]


def targets(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    cells = result["cells"]
    service_ms = result["service_s"] * 1000  # the mean service time
    slots = result["args"]["slots"]
    out: list[tuple[str, str, str]] = []
    tq = [c for c in cells if c["mode"] == "tierq"]

    def base(c: dict[str, Any]) -> dict[str, Any] | None:
        for b in tq:
            if b["load"] == 0.5 and b["share"] == c["share"] and b["stream"] == c["stream"]:
                return b
        return None

    for c in tq:
        if c["load"] < 2:
            continue
        b = base(c)
        if b is None:
            continue
        name = f"{c['load']:g}x, {c['share']:.0%} priority, {'SSE' if c['stream'] else 'JSON'}"
        p99, b99 = c["priority"]["ttft_p99"], b["priority"]["ttft_p99"]
        demand = c["load"] * c["share"]
        note = f" (priority demand alone {demand:g}x capacity)" if demand >= 1 else ""
        ok1 = p99 <= b99 + service_ms
        out.append((f"priority p99 TTFT <= 0.5x p99 + one service time ({name})",
                    "met" if ok1 else "missed",
                    f"{p99:.0f} ms vs {b99:.0f} + {service_ms:.0f} ms{note}"))
        if slots >= 64:
            ok2 = p99 <= 1.2 * b99
            out.append((f"priority p99 TTFT <= 1.2x its 0.5x value, 64 slots ({name})",
                        "met" if ok2 else "missed", f"{p99:.0f} ms vs 1.2 x {b99:.0f} ms{note}"))
    below = [c for c in tq if c["load"] * c["share"] < 1]
    shed_p = sum(sum(c["priority"]["shed"].values()) for c in below)
    out.append(("no priority shed while priority demand alone < capacity",
                "met" if shed_p == 0 else "missed",
                f"{shed_p} priority sheds over {len(below)} runs"))
    waits = [c for c in tq if c["busy"]["busy_mean"] is not None and c["load"] >= 1]
    if waits:
        worst = min(c["busy"]["busy_mean"] for c in waits)
        out.append(("sim busy >= 95% of the time anything waits (tierq, loads >= 1x)",
                    "met" if worst >= 0.95 else "missed",
                    f"worst mean busy fraction while waiting {worst:.1%}"))
    ra = [(c, t) for c in tq for t in ("priority", "default") if c[t]["retried"]]
    missing = sum(c[t]["ra_missing"] for c, t in ra)
    within = [c[t]["ra_within_2x"] for c, t in ra if not math.isnan(c[t]["ra_within_2x"])]
    worst_ra = min(within) if within else math.nan
    got = sum(c[t]["retry_got_in"] for c, t in ra)
    again = sum(c[t].get("retry_shed_again", 0) for c, t in ra)
    tried = sum(c[t]["retried"] for c, t in ra)
    out.append(("every 429 carries a Retry-After within 2x of the wait that followed",
                "met" if missing == 0 and within and worst_ra == 1.0 else "missed",
                f"{missing} 429s without the headers; worst run: {_pct(worst_ra)} of retries "
                f"that got in waited within 2x of retry-after-ms ({got} got in, {again} of {tried} "
                "retries came back to a full queue or timed out again)"))
    on = [(c, t) for c, t in ra if c[t].get("load_retry_got_in")]
    if on:
        w = min(on, key=lambda ct: ct[0][ct[1]]["load_ra_within_2x"])
        s = w[0][w[1]]
        out.append(("… the same, retries sent while the load was on (not after the last arrival)",
                    "met" if s["load_ra_within_2x"] == 1.0 else "missed",
                    f"worst run: {_pct(s['load_ra_within_2x'])} within 2x (p50 {s['load_ra_ratio_p50']:.2f}, "
                    f"p90 {s['load_ra_ratio_p90']:.2f}); "
                    f"{sum(c[t]['load_retry_shed_again'] for c, t in on)} of "
                    f"{sum(c[t]['load_retried'] for c, t in on)} such retries shed again"))
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    streams = sorted({c["stream"] for c in cells})
    shares = sorted({c["share"] for c in cells if c["mode"] == "tierq"})
    fig, axes = plt.subplots(len(streams), len(shares), figsize=(6 * len(shares), 4 * len(streams)),
                             squeeze=False)
    for i, stream in enumerate(streams):
        for j, share in enumerate(shares):
            ax = axes[i][j]
            tq = sorted([c for c in cells if c["mode"] == "tierq" and c["stream"] == stream
                         and c["share"] == share], key=lambda c: c["load"])
            for tier, style in (("priority", "o-"), ("default", "s-")):
                ax.plot([c["load"] for c in tq], [c[tier]["ttft_p99"] for c in tq], style,
                        label=f"tierq {tier} p99")
                ax.plot([c["load"] for c in tq], [c[tier]["ttft_p50"] for c in tq], style[0] + ":",
                        label=f"tierq {tier} p50", alpha=0.6)
            for mode, style in (("fifo", "^--"), ("direct", "v--")):
                bc = sorted([c for c in cells if c["mode"] == mode and c["stream"] == stream],
                            key=lambda c: c["load"])
                if bc:
                    ax.plot([c["load"] for c in bc], [c["all"]["ttft_p99"] for c in bc], style,
                            label=f"{'FIFO (tiers ignored)' if mode == 'fifo' else 'direct to sim'} p99")
            ax.set_xscale("log", base=2)
            loads = sorted({c["load"] for c in cells})
            ax.set_xticks(loads, [f"{x:g}x" for x in loads])
            ax.set_yscale("log")
            ax.set_xlabel("offered load (x backend capacity)")
            ax.set_ylabel("time to first token, ms (served requests)")
            ax.set_title(f"{'SSE' if stream else 'JSON'}, {share:.0%} priority")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    a = result["args"]
    fig.suptitle(f"tierq under overload: sim {a['slots']} slots, mean service {result['service_s']*1000:.0f} ms, "
                 f"capacity {result['capacity_rps']:.0f} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict[str, Any], name: str) -> None:
    a = result["args"]
    md = [f"# Overload: priority vs default ({name})\n",
          f"Sim: {a['slots']} slots, TTFT {a['ttft_ms']:g} ms, {a['tokens_per_s']:g} tokens/s, "
          f"{a.get('max_tokens_min', a['max_tokens'])}-{a['max_tokens']} tokens per answer (uniform): "
          f"mean service time {result['service_s']*1000:.0f} ms, "
          f"capacity {result['capacity_rps']:.1f} req/s. Gateway: queue_depth {a['queue_depth']}, "
          f"max_wait_ms default {a['wait_default_ms']} / priority {a['wait_priority_ms']}, "
          f"priority_headroom {a.get('priority_headroom', 0)}. "
          f"Open-loop Poisson arrivals, {a['duration']:g} s per run, first {a['warmup']:g} s "
          f"not counted; every client honours retry-after-ms once after a 429. "
          f"Machine: {result['machine']}.\n",
          "TTFT of a JSON answer is its total time. `fifo` = the same gateway with no request "
          "sending service_tier (one lane); `direct` = straight to the sim (it queues without "
          "limit, never sheds). Baseline rows pool both tags.\n"]
    for stream in sorted({c["stream"] for c in result["cells"]}):
        rows = []
        for c in result["cells"]:
            if c["stream"] != stream:
                continue
            if c["mode"] == "tierq":
                rows.append(_row(c, "priority", c["priority"]))
                rows.append(_row(c, "default", c["default"]))
            else:
                rows.append(_row(c, "all", c["all"]))
        md.append(f"\n## {'Streaming (SSE)' if stream else 'Non-streaming (JSON)'}\n")
        md.append(h.md_table(HEAD, rows))
    md.append("\n## Priority time to first token, taken apart (tierq)\n")
    md.append("Queue = the gateway's own x-tierq-queue-ms (waiting for a slot); TTFT − queue = the "
              "backend's TTFT plus everything else on the way (proxying, the gateway's event loop, "
              "the generator). Gateway CPU in cores over the run; /metrics p99 = round trip of "
              "the sampler's scrape every 0.1 s, a probe of the event loop's lag. Waiting for a CPU = share "
              "of the run the gateway's main thread was runnable but not running (/proc schedstat): "
              "the CPU other processes took from it.\n\n")
    md.append(h.md_table(
        ["body", "priority share", "load", "n", "TTFT p50 / p99 ms", "queue p50 / p99 ms",
         "TTFT − queue p50 / p99 ms", "gateway CPU, cores", "gateway waiting for a CPU",
         "/metrics p99 ms", "machine CPU busy (all processes)"],
        [[("SSE" if c["stream"] else "JSON"), f"{c['share']:.0%}", f"{c['load']:g}x", c["priority"]["n"],
          f"{fmt(c['priority']['ttft_p50'], 0)} / {fmt(c['priority']['ttft_p99'], 0)}",
          f"{fmt(c['priority'].get('queue_p50'), 0)} / {fmt(c['priority'].get('queue_p99'), 0)}",
          f"{fmt(c['priority'].get('ttft_less_queue_p50'), 0)} / {fmt(c['priority'].get('ttft_less_queue_p99'), 0)}",
          f"{(c.get('cpu_cores') or {}).get('gateway', math.nan):.2f}",
          _pct(c.get("gw_runqueue_wait_share", math.nan)), fmt(c.get("gw_probe_p99_ms"), 0),
          _pct(c.get("machine_busy_share", math.nan))]
         for c in result["cells"] if c["mode"] == "tierq"]))
    md.append("\n## Targets\n")
    md.append(h.md_table(["target", "result", "measured"], targets(result)))
    worst = max(result["cells"], key=lambda c: c["sender_late_p99_ms"])
    tq_late = max(c["sender_late_p99_ms"] for c in result["cells"] if c["mode"] != "direct")
    md.append(f"\nLoad generator: p99 lateness of a send against its Poisson schedule at most "
              f"{tq_late:.1f} ms in the gateway runs; worst overall {worst['sender_late_p99_ms']:.1f} ms "
              f"({worst['mode']} {worst['load']:g}x; the machine is shared, so a late send is the "
              f"generator losing the CPU for a moment). "
              f"Highest requests in flight at the sim through tierq: "
              f"{max(c['sim_max_in_flight'] for c in result['cells'] if c['mode'] != 'direct')} "
              f"(max_concurrency {a['slots']}). Gateway CPU: at most "
              f"{max((c.get('cpu_cores') or {}).get('gateway', 0) for c in result['cells']):.2f} cores in any run "
              f"(one process: its ceiling is 1 core).\n")
    md.append(f"\n![overload]({name}.png)\n")
    (h.RESULTS / f"{name}.md").write_text("".join(md))
    plot(result, h.RESULTS / f"{name}.png")
    h.log(f"wrote {h.RESULTS / (name + '.md')} and {name}.png")


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "overload"
    write_report(json.loads((h.RESULTS / f"{name}.json").read_text()), name)
