"""bench/fairness's Markdown report: each cell FIFO against fair, with the issue's
targets and whether each is met. Reads the dict run.py builds (or its JSON)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))
import harness as h  # noqa: E402


def num(x: Any) -> float:
    return math.nan if x is None else float(x)


def ratio(a: Any, b: Any) -> float:
    a, b = num(a), num(b)
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**missed**")


def find(report: dict[str, Any], cell: str, limit: str, fairness: str) -> dict[str, Any] | None:
    return next((c for c in report["cells"] if c["cell"] == cell and c["limit"] == limit
                 and c["fairness"] == fairness), None)


def lat(c: dict[str, Any] | None, key: str, q: str) -> Any:
    if c is None or key not in c:
        return None
    return c[key][q]


def pred(c: dict[str, Any]) -> str:
    """The p50 of |realized - predicted| wait (the histogram bucket's upper edge,
    so an upper bound; and interpolated in the bucket, histogram_quantile's
    estimate) against the lane's p50 queue time in the cell."""
    ms = num(c.get("prediction_error_p50_ms"))
    if math.isnan(ms):
        return "–"
    out = f"<= {ms:,.0f} ms ({100 * num(c.get('prediction_error_p50')):.0f}% of {num(c.get('queue_p50_ms')):,.0f})"
    est = num(c.get("prediction_error_p50_interpolated_ms"))
    if not math.isnan(est):
        out += f"; interpolated {est:,.0f} ms ({100 * num(c.get('prediction_error_p50_interpolated')):.0f}%)"
    return out


def shared_note(report: dict[str, Any], what: str) -> str:
    """The run's keys that share a flow queue (their key ids are random, so this
    differs from run to run): a shared queue's counter carries both keys' service."""
    shared = (report.get("shared_queues") or {}).get(what)
    if shared is None:
        return ""
    if not shared:
        return "\nIn this run no two of these keys share a flow queue of their hands of two.\n"
    return ("\nKeys sharing a flow queue of their hands of two in this run (random key ids, so it "
            "differs from run to run; a shared queue's counter carries both keys' service): "
            + "; ".join(f"queue {q}: {', '.join(ns)}" for q, ns in shared) + ".\n")


def render(report: dict[str, Any]) -> str:
    out = [f"# bench/fairness: {report['name']}\n\n",
           f"{report['machine']}; load average at the end {report['load_end'][0]:.2f}; "
           f"{report['elapsed_s']:.0f} s in all. Engine: `tierq sim`, {report['args']['slots']} slots, "
           f"ttft {report['args']['ttft_ms']:g} ms, {report['args']['tokens_per_s']:g} tokens/s, "
           f"{report['args']['max_tokens_min']}-{report['args']['max_tokens']} tokens a request, "
           f"capacity {report['capacity_rps']:.1f} req/s measured straight. Cells of "
           f"{report['args']['duration']:g} s (the first {report['args']['warmup']:g} s left out). "
           "Limit *known*: `max_concurrency` = the slots; *learned*: adaptive. Each cell through a "
           "FIFO gateway (`fairness = \"off\"`) and a fair one (`\"tokens\"`) in the same run.\n\n"]
    if not report["fair_build"]:
        out.append("**This build has no `fairness` setting: FIFO gateways only (the baseline).**\n\n")
    limits = report["args"]["limits"].split(",")
    fairs = ["off", "tokens"] if report["fair_build"] else ["off"]

    # -- greedy beside polite
    out.append("## A greedy key beside nine polite ones\n\n"
               f"Nine polite keys, {report['args']['polite_load']:g}x capacity in all (Poisson), one greedy "
               f"key holding {report['args']['greedy_streams']} streams. TTFT in ms of the polite keys; "
               "*mark*: the nine strictly ahead (priority lane) of the greedy key (default lane), the "
               "target is polite p99 <= 1.25x the mark's p99 of the same gateway. *greedy-mixed*: a "
               "greedy priority key beside five polite priority and four polite default keys.\n\n")
    rows = []
    for limit in limits:
        for fair in fairs:
            mark = find(report, "mark", limit, fair)
            mark_p99 = lat(mark, "polite_priority", "ttft_p99")
            for cell, lane in (("greedy-default", "default"), ("greedy-priority", "priority"),
                               ("greedy-mixed", "priority"), ("greedy-mixed", "default"),
                               ("mark", "priority")):
                c = find(report, cell, limit, fair)
                if c is None or f"polite_{lane}" not in c:
                    continue
                p = c[f"polite_{lane}"]
                g = c.get("greedy_priority") or c.get("greedy_default") or {}
                r = ratio(p["ttft_p99"], mark_p99) if cell != "mark" else math.nan
                target = None if cell == "mark" or (cell == "greedy-mixed" and lane == "default") \
                    else r <= 1.25
                shed = sum(p["shed"].values())
                rows.append([limit, fair, cell, lane, h.fmt(num(p["ttft_p50"]), 0), h.fmt(num(p["ttft_p99"]), 0),
                             f"{p['ok']}/{p['n']}" + (f" ({shed} shed)" if shed else ""),
                             h.fmt(num(g.get("ttft_p50")), 0), h.fmt(num(c["total_rps"]), 2),
                             h.fmt(r, 2) + "x" if not math.isnan(r) else "–", verdict(target)])
    out.append(h.md_table(["limit", "fairness", "cell", "polite lane", "polite p50", "polite p99",
                           "polite served/sent", "greedy p50", "total req/s", "p99 / mark", "<= 1.25x"],
                          rows))
    out.append(shared_note(report, "greedy"))

    # -- throughput
    out.append("\n## Work conservation: total throughput, fair against FIFO\n\n"
               "Requests completed per second in the measured window, all keys; target >= 0.95x.\n\n")
    rows = []
    if "tokens" in fairs:
        for c in report["cells"]:
            if c["fairness"] != "tokens":
                continue
            base = find(report, c["cell"], c["limit"], "off")
            if base is None:
                continue
            r = ratio(c["total_rps"], base["total_rps"])
            rows.append([c["cell"], c["limit"], h.fmt(num(base["total_rps"]), 2), h.fmt(num(c["total_rps"]), 2),
                         h.fmt(num(base["total_tokens_per_s"]), 0), h.fmt(num(c["total_tokens_per_s"]), 0),
                         h.fmt(r, 3) + "x", verdict(None if math.isnan(r) else r >= 0.95),
                         h.fmt(num(base["limit_mean"]), 1) + " / " + h.fmt(num(c["limit_mean"]), 1)])
        out.append(h.md_table(["cell", "limit", "FIFO req/s", "fair req/s", "FIFO tok/s", "fair tok/s",
                               "fair / FIFO", ">= 0.95x", "mean limit FIFO / fair"], rows))
    else:
        out.append("(FIFO only)\n")

    # -- weights
    out.append("\n## Weights 1:2:4 under saturation\n\n"
               f"Six keys (weights 1, 1, 2, 2, 4, 4), {report['args']['backlog_streams']} streams each, "
               "default lane. Share of the tokens served against the weight's share (target: within "
               f"+-5%); Jain's index per {report['args']['window']:g} s window between the two keys of "
               "each weight (target >= 0.95; the lowest window shown).\n\n")
    rows = []
    for limit in limits:
        for fair in fairs:
            c = find(report, "weights", limit, fair)
            if c is None:
                continue
            sh = c["windows"]["shares"]
            cls: dict[str, list[float]] = {}
            for v in sh.values():
                cls.setdefault(f"{num(v['weight']):g}", []).append(num(v["share"]))
            total_w = sum(num(v["weight"]) for v in sh.values())
            parts, worst = [], 0.0
            for w, s in sorted(cls.items(), key=lambda x: float(x[0])):
                want = float(w) * len(s) / total_w
                dev = sum(s) / want - 1
                worst = max(worst, abs(dev))
                parts.append(f"w{w} {sum(s):.3f} ({dev:+.1%})")
            jmin = min((num(j) for win in c["windows"]["windows"] for j in win["jain_equal"].values()),
                       default=math.nan)
            rows.append([limit, fair, "; ".join(parts), verdict(worst <= 0.05) if fair == "tokens" else "–",
                         h.fmt(jmin, 3), verdict(jmin >= 0.95) if fair == "tokens" else "–"])
    out.append(h.md_table(["limit", "fairness", "shares (off the weight's)", "+-5%",
                           "min Jain (equal weights)", ">= 0.95"], rows))
    out.append(shared_note(report, "weights"))

    # -- deadlines
    out.append("\n## Deadlines\n\n"
               "Backlogged keys in the lane; a third of the requests carry `x-tierq-max-queue-ms` at "
               "0.2x-2x the lane's typical wait (its p50 queue time through the FIFO gateway under the same load with no deadline sent, measured first). "
               "*refused at once*: a 429 within 50 ms of sending (the others refused were admitted "
               "and shed when their deadline passed); *admitted*: served, or shed once its deadline passed; *missed*: admitted and then shed, or served after queueing "
               "longer than its deadline. Targets: refusals within 50 ms; in the priority lane <= 1% "
               "of the admitted miss; the prediction's error <= 20% at p50 (here: the p50 of the "
               "gateway's `tierq_queue_wait_prediction_error_seconds`, |realized - predicted|: the upper edge of "
               "the bucket the median falls in, and interpolated inside it as Prometheus' histogram_quantile "
               "does, the buckets being 100 and 250 ms apart there; "
               "against the lane's p50 wait).\n\n")
    rows = []
    for limit in limits:
        for fair in fairs:
            for cell in ("deadline-priority", "deadline-default"):
                c = find(report, cell, limit, fair)
                if c is None:
                    continue
                d = c["deadline"]
                refused = d["refused_fast"] + d["refused_slow"]
                miss = num(d["missed_share"])
                rows.append([limit, fair, cell.split("-")[1], h.fmt(num(c["typical_wait_ms"]), 0), d["n"],
                             f"{d['refused_fast']}/{refused}",
                             f"{h.fmt(num(d.get('join_refused_counted')), 0)} / {d.get('all_429_fast', '–')}",
                             h.fmt(num(d.get("refused_fast_ms_p99")), 1) + " / " + h.fmt(num(d.get("refused_fast_ms_max")), 1),
                             d["admitted"], f"{d['refused_slow'] + d['served_late']} ({h.fmt(100 * miss, 1)}%)",
                             verdict(miss <= 0.01) if cell == "deadline-priority" and fair == "tokens" else "–",
                             pred(c), h.fmt(num(c.get("deadline_margin")), 3)])
    out.append(h.md_table(["limit", "fairness", "lane", "typical wait ms", "with deadline",
                           "refused at once / refused", "whole cell: refused at join (gateway count) / 429 within 50 ms", "at once: p99 / max ms", "admitted", "missed",
                           "<= 1% (priority)", "prediction error p50 (of the p50 wait)",
                           "learned margin at the end (x the prediction)"], rows))

    # -- cpu
    cpu = report.get("cpu")
    out.append("\n## Gateway CPU per request\n\n")
    if cpu:
        rounds = len(next(iter(cpu["rounds"].values())))
        out.append(f"A fast engine ({report['args']['cpu_slots']} slots, limit fixed at them, 8 tokens), "
                   "ten keys closed loop (one with 4x the streams), the two gateways loaded in turn, "
                   f"{rounds} interleaved rounds of {report['args']['cpu_round_s']:g} s. CPU of the "
                   "gateway process (user + system) over requests served; target fair <= 1.05x off.\n\n")
        rows = [[f, h.fmt(num(cpu[f"{f}_pooled_us"]), 1), h.fmt(num(cpu[f"{f}_median_us"]), 1),
                 ", ".join(h.fmt(num(r["us_per_request"]), 0) for r in cpu["rounds"][f]),
                 sum(r["requests"] for r in cpu["rounds"][f])] for f in cpu["rounds"]]
        out.append(h.md_table(["fairness", "us/request (pooled)", "median round", "rounds", "requests"],
                              rows))
        if "ratio_pooled" in cpu:
            out.append(f"\nfair / off: {num(cpu['ratio_pooled']):.3f}x pooled, {num(cpu['ratio_median']):.3f}x "
                       f"by median round: {verdict(num(cpu['ratio_pooled']) <= 1.05)}.\n")
    else:
        out.append("(not run)\n")
    return "".join(out)


if __name__ == "__main__":
    print(render(json.loads(Path(sys.argv[1]).read_text())))
