"""Turns bench/results/<name>.json.gz from run.py into <name>.md (the table, same-run
ratios, targets met or missed) and <name>.png (priority p99 TTFT and busy share
against the oracle's, and the capacity-change time series).

`python bench/capacity/report.py [name]` re-renders from the JSON without rerunning.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))
import harness as h  # noqa: E402

fmt = h.fmt
OVERLOAD = (2.0, 4.0)
TTFT_TARGET, BUSY_TARGET, BACK_TARGET_S, DONE_TTFT_TARGET = 1.2, 0.95, 5.0, 1.3
MODE_LABEL = {"adaptive": "adaptive", "fixed64": "fixed 64", "oracle": "oracle (fixed = slots)",
              "engine": "engine priority alone"}


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _ratio(a: Any, b: Any) -> float:
    return math.nan if _nan(a) or _nan(b) or not b else float(a) / float(b)


def _x(x: float) -> str:
    return "–" if _nan(x) else f"{x:.2f}x"


def _pct(x: Any) -> str:
    return "–" if _nan(x) else f"{100 * x:.0f}%"


def find(cells: list[dict[str, Any]], backend: str, mode: str, load: float) -> dict[str, Any] | None:
    for c in cells:
        if c["backend"] == backend and c["mode"] == mode and c["load"] == load:
            return c
    return None


def oracle_of(cells: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, Any] | None:
    return find(cells, c["backend"], "oracle", c["load"])


def ratios(cells: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, float]:
    base = find(cells, c["backend"], c["mode"], 0.5)
    o = oracle_of(cells, c)
    return {
        "vs_own_half": _ratio(c["priority"]["ttft_p99"], base and base["priority"]["ttft_p99"]),
        "vs_oracle": _ratio(c["priority"]["ttft_p99"], o and o["priority"]["ttft_p99"]),
        "busy_vs_oracle": _ratio(c["busy"], o and o["busy"]),
    }


def _limit(c: dict[str, Any]) -> str:
    if _nan(c["limit_mean"]):
        return "–"
    kinds = [k for k in c.get("limit_kind", []) if not k.startswith("fixed")]
    signal = f" {', '.join(kinds)}" if kinds else ""
    if c["limit_min"] == c["limit_max"]:
        return f"{c['limit_mean']:.0f}{signal}"
    return f"{c['limit_mean']:.1f} ({c['limit_min']:.0f}–{c['limit_max']:.0f}){signal}"


def _shed(s: dict[str, Any]) -> str:
    if not s["shed"]:
        return "0"
    return ", ".join(f"{k} {v}" for k, v in sorted(s["shed"].items()))


HEAD = ["backend", "load", "gateway", "priority TTFT p50 ms", "p90 ms", "p99 ms", "priority served",
        "p99 ÷ own 0.5x", "p99 ÷ oracle", "priority sheds", "default goodput ÷ capacity",
        "busy", "busy ÷ oracle", "engine queue (mean)", "gateway limit (mean, range)",
        "errors"]


def table(result: dict[str, Any]) -> str:
    cells = result["cells"]
    rows = []
    for c in cells:
        r = ratios(cells, c)
        p = c["priority"]
        errs = p["other_errors"] + c["default"]["other_errors"]
        rows.append([
            c["backend"], f"{c['load']:g}x", MODE_LABEL.get(c["mode"], c["mode"]),
            fmt(p["ttft_p50"], 0), fmt(p.get("ttft_p90"), 0), fmt(p["ttft_p99"], 0), p["ok"],
            _x(r["vs_own_half"]),
            "–" if c["mode"] == "oracle" else _x(r["vs_oracle"]), _shed(p),
            _pct(c["default_goodput_share"]), _pct(c["busy"]),
            "–" if c["mode"] == "oracle" else _x(r["busy_vs_oracle"]),
            fmt(c["engine_waiting_mean"], 1), _limit(c), str(errs) if errs else "0",
        ])
    return h.md_table(HEAD, rows)


def summary(result: dict[str, Any]) -> str:
    """One row per backend and load: each gateway's priority p99 TTFT against the
    oracle's, and adaptive's busy share, goodput and sheds."""
    cells = result["cells"]
    rows = []
    seen = []
    for c in cells:
        key = (c["backend"], c["load"])
        if key in seen:
            continue
        seen.append(key)
        o = find(cells, *key[:1], "oracle", key[1])
        a = find(cells, key[0], "adaptive", key[1])

        def p99(mode: str) -> str:
            x = find(cells, key[0], mode, key[1])
            if x is None:
                return "–"
            r = ratios(cells, x)
            return f"{fmt(x['priority']['ttft_p99'], 0)} ({_x(r['vs_oracle'])})"

        rows.append([
            key[0], f"{key[1]:g}x", fmt(o and o["priority"]["ttft_p99"], 0),
            p99("adaptive"), p99("fixed64"), p99("engine"),
            "–" if a is None else _x(ratios(cells, a)["busy_vs_oracle"]),
            "–" if a is None else _x(ratios(cells, a)["vs_own_half"]),
            "–" if a is None else f"{_pct(a['default_goodput_share'])} / {_pct(o and o['default_goodput_share'])}",
            "–" if a is None else str(a["priority"]["shed_n"]),
            "–" if a is None else _limit(a),
        ])
    return h.md_table(["backend", "load", "oracle: priority p99 TTFT ms", "adaptive (÷ oracle)",
                       "fixed 64 (÷ oracle)", "engine priority alone (÷ oracle)",
                       "adaptive busy ÷ oracle's", "adaptive p99 ÷ its 0.5x",
                       "default goodput ÷ capacity, adaptive / oracle", "adaptive priority sheds",
                       "adaptive limit (mean, range)"], rows)


def targets(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, met/missed) rows."""
    cells = result["cells"]
    out: list[tuple[str, str, str]] = []
    for c in cells:
        if c["mode"] != "adaptive":
            continue
        r = ratios(cells, c)
        if c["load"] in OVERLOAD:
            out.append((f"{c['backend']} {c['load']:g}x: adaptive priority p99 TTFT within "
                        f"{TTFT_TARGET}x of the oracle's",
                        f"{_x(r['vs_oracle'])} ({fmt(c['priority']['ttft_p99'], 0)} ms)",
                        _met(r["vs_oracle"] <= TTFT_TARGET)))
            out.append((f"{c['backend']} {c['load']:g}x: busy at least {BUSY_TARGET:.0%} of the oracle's",
                        f"{_x(r['busy_vs_oracle'])} ({_pct(c['busy'])})",
                        _met(r["busy_vs_oracle"] >= BUSY_TARGET)))
        if c["load"] == 3.0:
            kind = next((b["kind"] for b in result["backends"] if b["name"] == c["backend"]), "?")
            shed = c["priority"]["shed_n"]
            out.append((f"done-when, kind \"{kind}\" ({c['backend']}) 3x: within {DONE_TTFT_TARGET}x "
                        f"of the oracle's priority p99 TTFT, no priority shed",
                        f"{_x(r['vs_oracle'])}, {shed} priority shed",
                        _met(r["vs_oracle"] <= DONE_TTFT_TARGET and shed == 0)))
    ch = result.get("change")
    if ch and "adaptive" in ch["runs"]:
        run = ch["runs"]["adaptive"]
        for what, back in zip(("halves", "doubles"), run["back_s"]):
            out.append((f"capacity {what} ({ch['backend']}): back within bounds in {BACK_TARGET_S:g} s",
                        "never (within the phase)" if back is None else f"{back:.1f} s",
                        _met(back is not None and back <= BACK_TARGET_S)))
    return out


def _change_label(mode: str, ch: dict[str, Any]) -> str:
    if mode == "oracle":
        return f"fixed {ch['slots']} (the oracle before the change, not told of it)"
    return MODE_LABEL.get(mode, mode)


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def write_report(result: dict[str, Any], name: str) -> None:
    args = result["args"]
    lines = [
        f"# Capacity the gateway is not told ({name})\n\n",
        ("" if result.get("complete", True) else "**Incomplete: the run stopped before its end.**\n\n"),
        f"{result['machine']}; whole run {result['wall_s'] / 60:.1f} min. Open-loop Poisson "
        f"arrivals, {args['duration']:g} s per run (the first {args['warmup']:g} s left out), "
        f"10% priority, every request streaming, output length uniform in "
        f"[{args['max_tokens_min']}, {args['max_tokens']}] tokens, no client retry; gateway "
        f"max_wait_ms default {args['wait_default_ms']}, priority {args['wait_priority_ms']}, "
        f"everything else tierq's defaults. Load is x the engine's capacity measured by a "
        f"saturating run straight to it.\n\n",
        "## Backends\n\n",
        h.md_table(["backend", "slots", "engine queue", "gateway kind", "/metrics",
                    "429 past waiting", "ttft ms", "tokens/s alone", "batch knee",
                    "capacity req/s (measured)", "closed form"],
                   [[b["name"], b["slots"], b["scheduling"], b["kind"], "yes" if b["metrics"] else "no",
                     b["max_waiting"] if b["max_waiting"] is not None else "–", f"{b['ttft_ms']:g}",
                     f"{b['tokens_per_s']:g}", f"{b['batch_knee']:g}", fmt(b["capacity_rps"], 1),
                     fmt(b["closed_form_rps"], 1)] for b in result["backends"]]),
        "\n## Summary\n\n",
        "Priority p99 TTFT in ms, in brackets against the oracle's in the same run "
        "(fixed 64 is the oracle itself on a 64-slot engine: no entry there).\n\n",
        summary(result),
        "\n## Results\n\n",
        "Ratios are within this run: a gateway's priority p99 TTFT against its own at 0.5x, "
        "and against the oracle's (max_concurrency = the engine's slots) at the same load; "
        "busy is the engine's running / slots sampled every 0.1 s.\n\n",
        table(result),
        "\n## Targets\n\n",
        h.md_table(["target", "measured", ""], targets(result)),
    ]
    ch = result.get("change")
    if ch:
        lines += [
            f"\n## Capacity change ({ch['backend']})\n\n",
            f"{ch['rate']:.1f} req/s throughout ({args['change_load']:g}x of {ch['slots']} slots); "
            f"slots {ch['slots']} → {ch['half']} at {ch['t_changes'][0]:g} s → {ch['slots']} at "
            f"{ch['t_changes'][1]:g} s. Every {args['series_step']:g} s: priority p99 TTFT of the "
            f"arrivals in the last {args['series_ttft_window']:g} s, busy over the last "
            f"{args['series_busy_window']:g} s. Within bounds: p99 at most 1.2x and busy at least "
            f"95% of an oracle held at the current slots (same rate, its own run), holding "
            f"for {args['hold']:g} s.\n\n",
            h.md_table(["oracle at", "priority p99 TTFT ms", "busy", "priority sheds"],
                       [[f"{k} slots", fmt(v["ttft_p99"], 0), _pct(v["busy"]), v["priority_shed"]]
                        for k, v in ch["oracle"].items()]),
            "\n",
            h.md_table(["gateway", "back after halving", "back after doubling", "priority sheds"],
                       [[_change_label(m, ch), "never" if r["back_s"][0] is None else f"{r['back_s'][0]:.1f} s",
                         "never" if r["back_s"][1] is None else f"{r['back_s'][1]:.1f} s",
                         r["priority_shed"]] for m, r in ch["runs"].items()]),
        ]
    out = h.RESULTS / f"{name}.md"
    out.write_text("".join(lines))
    png = plot(result, name)
    h.log(f"wrote {out}" + (f" and {png}" if png else ""))


def plot(result: dict[str, Any], name: str) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    cells = result["cells"]
    ch = result.get("change")
    fig, axes = plt.subplots(1, 3 if ch else 2, figsize=(17 if ch else 12, 4.8))
    over = sorted({c["load"] for c in cells if c["load"] > 1})
    backends = [b["name"] for b in result["backends"]]
    colors = {"adaptive": "tab:blue", "fixed64": "tab:red", "engine": "tab:green"}
    for ax, key, title in ((axes[0], "vs_oracle", "priority p99 TTFT ÷ oracle's"),
                           (axes[1], "busy_vs_oracle", "engine busy ÷ oracle's")):
        labels = [f"{b} {l:g}x" for b in backends for l in over if find(cells, b, "oracle", l)]
        width = 0.8 / 3
        for k, mode in enumerate(("adaptive", "fixed64", "engine")):
            ys = []
            for b in backends:
                for l in over:
                    if not find(cells, b, "oracle", l):
                        continue
                    c = find(cells, b, mode, l)
                    ys.append(ratios(cells, c)[key] if c else math.nan)
            ax.bar([i + (k - 1) * width for i in range(len(ys))], ys, width, label=MODE_LABEL[mode],
                   color=colors[mode])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(TTFT_TARGET if key == "vs_oracle" else BUSY_TARGET, color="grey", ls="--", lw=0.8,
                   label="target")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=70, fontsize=7)
        ax.set_title(title)
        if key == "vs_oracle":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
            top = max([y for y in ax.get_ylim()] + [1.5])
            ax.set_yticks([y for y in (0.5, 0.8, 1, 1.2, 1.5, 2, 3, 5, 10, 20, 50, 100) if y <= top * 1.1])
        ax.legend(fontsize=7)
    if ch and "adaptive" in ch["runs"]:
        ax = axes[2]
        pts = ch["runs"]["adaptive"]["series"]
        t = [p["t"] for p in pts]
        ax.plot(t, [p["priority_ttft_p99"] for p in pts], color="tab:blue",
                label="adaptive priority p99 TTFT (ms, 2 s window)")
        if "oracle" in ch["runs"]:
            ax.plot([p["t"] for p in ch["runs"]["oracle"]["series"]],
                    [p["priority_ttft_p99"] for p in ch["runs"]["oracle"]["series"]],
                    color="grey", lw=0.8, label=f"fixed {ch['slots']}: priority p99 TTFT")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        lo, hi = ax.get_ylim()
        ax.set_yticks([y for y in (50, 100, 200, 300, 500, 1000, 2000, 3000, 5000, 10000, 20000)
                       if lo <= y <= hi])
        ref = {int(k): v for k, v in ch["oracle"].items()}
        ax.plot(t, [ref[p["slots"]]["ttft_p99"] * 1.2 if p["slots"] in ref else math.nan for p in pts],
                color="tab:blue", ls="--", lw=0.8, label="1.2x oracle's at current slots")
        ax.set_xlabel("s")
        ax.set_ylabel("ms")
        ax2 = ax.twinx()
        ax2.plot(t, [p["limit"] for p in pts], color="tab:orange", label="gateway limit")
        ax2.plot(t, [p["slots"] for p in pts], color="black", lw=0.8, label="engine slots")
        ax2.plot(t, [p["busy"] * (p["slots"] or 0) if not _nan(p["busy"]) else math.nan for p in pts],
                 color="tab:green", lw=0.8, label="engine running")
        ax2.set_ylabel("sequences")
        for tc in ch["t_changes"]:
            ax.axvline(tc, color="grey", ls=":")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
        ax.set_title(f"capacity change ({ch['backend']}, {ch['rate']:.0f} req/s)")
    fig.tight_layout()
    out = h.RESULTS / f"{name}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    stem = sys.argv[1] if len(sys.argv) > 1 else "capacity"
    write_report(h.load_raw(stem), stem)
