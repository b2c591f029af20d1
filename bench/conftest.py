"""Shared plumbing for the microbenchmarks: each benchmark records its per-op
time under (scenario, implementation); at the end of the session the pairs are
printed as a table (ours, baseline, ratio) and written to bench/results/micro.md."""

from __future__ import annotations

import asyncio
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# scenario -> implementation -> (min, median) ns per operation
RESULTS: dict[str, dict[str, tuple[float, float]]] = {}
OURS, BASELINE, FLOOR = "tierq", "pyref", "floor"
# scenario -> what its baseline is, when it is not bench/pyref.py
BASELINE_NAMES: dict[str, str] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--micro-md",
        default=str(Path(__file__).parent / "results" / "micro.md"),
        help="where to write the ours/baseline/ratio table ('' to skip writing)",
    )


def record(benchmark: object, scenario: str, impl: str, ops_per_call: int,
           baseline: str = "pyref") -> None:
    """Notes the best and median time per operation, when benchmarks are enabled.

    The ratio uses the best round: on a shared 2-core machine the median mostly
    measures the neighbours; the median is shown beside it for honesty."""
    BASELINE_NAMES[scenario] = baseline
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the body ran once, as a smoke test
        return
    best = stats.stats.min / ops_per_call * 1e9
    median = stats.stats.median / ops_per_call * 1e9
    benchmark.extra_info["per_op_ns"] = {"min": best, "median": median}  # type: ignore[attr-defined]
    RESULTS.setdefault(scenario, {})[impl] = (best, median)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh default-policy event loop; a benchmark runs whole coroutines in it."""
    lp = asyncio.new_event_loop()
    try:
        yield lp
    finally:
        lp.run_until_complete(lp.shutdown_asyncgens())
        lp.close()


def _fmt(ns: float) -> str:
    return f"{ns / 1000:.2f} us" if ns >= 1000 else f"{ns:.0f} ns"


def _cell(v: tuple[float, float] | None) -> str:
    return f"{_fmt(v[0])} (median {_fmt(v[1])})" if v else "n/a"


def table() -> list[str]:
    lines = [
        "| scenario | tierq per op | baseline | baseline per op | speed-up (baseline / tierq, best) | floor: no-op `async with` |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for scenario, row in RESULTS.items():
        ours, base = row.get(OURS), row.get(BASELINE)
        ratio = f"{base[0] / ours[0]:.2f}x" if ours and base else "n/a"
        floor = row.get(FLOOR)
        name = BASELINE_NAMES.get(scenario, "pyref")
        lines.append(f"| {scenario} | {_cell(ours)} | {name} | {_cell(base)} | {ratio} | "
                     f"{_cell(floor) if floor else '-'} |")
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if not RESULTS:
        return
    lines = table()
    terminalreporter.write_sep("-", "tierq vs baseline (best round per op, median beside)")
    for line in lines:
        terminalreporter.write_line(line)
    out = config.getoption("--micro-md")
    if out:
        header = [
            "# Python microbenchmarks: tierq vs its baselines",
            "",
            f"Python {sys.version.split()[0]}, {platform.machine()}, asyncio default loop. "
            "Best round per operation (median beside it); ratio from the best rounds. "
            "Written by `pytest bench --benchmark-enable`.",
            "",
        ]
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(header + lines) + "\n")
