"""The `tierq usage` reports: the ledger's usage sums as a table, JSON or CSV.

Costs stay exact: the table pads them to a common number of decimals and JSON
and CSV carry them as strings. `parse_since` reads `--since`.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import fields
from datetime import datetime, timezone
from decimal import Decimal
from typing import Final

import orjson

from tierq.ledger import UsageLine, cost_text

__all__ = ["parse_since", "render_csv", "render_json", "render_table", "usage_report"]

_COUNTS: Final = ("requests", "served", "shed", "failed", "cancelled",
                  "prompt_tokens", "completion_tokens")  # fmt: skip


def _total(lines: Sequence[UsageLine]) -> UsageLine:
    sums = {name: sum(getattr(line, name) for line in lines) for name in _COUNTS}
    cost = sum((line.cost for line in lines), Decimal(0))
    return UsageLine(key_id="TOTAL", model="", applied_tier="", cost=cost, **sums)


def _cost_strings(costs: Iterable[Decimal]) -> list[str]:
    """Exact costs padded to a common number of decimals (adding zeros is exact)."""
    costs = list(costs)
    places = max((max(0, -int(c.normalize().as_tuple().exponent)) for c in costs), default=0)
    places = max(places, 2)
    return [cost_text(c.quantize(Decimal(1).scaleb(-places))) for c in costs]


def render_table(lines: Sequence[UsageLine], by_fairness_id: bool = False) -> str:
    """An aligned plain-text table with a TOTAL row (and a FAIRNESS_ID column
    after KEY for lines by fairness id; "-" for requests without one)."""
    fid: tuple[str, ...] = ("FAIRNESS_ID",) if by_fairness_id else ()
    header = ("KEY", *fid, "MODEL", "TIER", "REQUESTS", "SERVED", "SHED", "FAILED", "CANCELLED",
              "PROMPT_TOKENS", "COMPLETION_TOKENS", "COST_USD")  # fmt: skip
    all_lines = [*lines, _total(lines)]
    costs = _cost_strings(line.cost for line in all_lines)
    body = [
        (line.key_id, *((line.fairness_id or ("" if line.key_id == "TOTAL" else "-"),)
                        if by_fairness_id else ()),
         line.model, line.applied_tier, *(str(getattr(line, name)) for name in _COUNTS), cost)
        for line, cost in zip(all_lines, costs)
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    texts = 3 + len(fid)

    def fmt(row: Sequence[str]) -> str:
        # Text columns left-aligned, numbers right-aligned.
        cells = [c.ljust(w) if i < texts else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in body[:-1]), rule, fmt(body[-1])]) + "\n"


def _names(by_fairness_id: bool) -> list[str]:
    """The fields of a line as JSON and CSV show them: fairness_id (after key_id)
    only for lines by fairness id."""
    names = [f.name for f in fields(UsageLine) if f.name != "fairness_id"]
    return [names[0], "fairness_id", *names[1:]] if by_fairness_id else names


def _as_dict(line: UsageLine, by_fairness_id: bool = False) -> dict[str, object]:
    d: dict[str, object] = {name: getattr(line, name) for name in _names(by_fairness_id)}
    d["cost"] = cost_text(line.cost)  # a string: JSON numbers would pass through floats
    return d


def usage_report(lines: Sequence[UsageLine], by_fairness_id: bool = False) -> dict[str, object]:
    """The report as JSON holds it (`tierq usage --json`, GET /admin/v1/usage):
    the lines and their total, costs as exact strings."""
    total = _as_dict(_total(lines))
    for name in ("key_id", "model", "applied_tier"):
        del total[name]
    return {"lines": [_as_dict(line, by_fairness_id) for line in lines], "total": total}


def render_json(lines: Sequence[UsageLine], by_fairness_id: bool = False) -> str:
    return orjson.dumps(usage_report(lines, by_fairness_id), option=orjson.OPT_INDENT_2).decode()


def render_csv(lines: Sequence[UsageLine], by_fairness_id: bool = False) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_names(by_fairness_id))
    for line in lines:
        w.writerow(_as_dict(line, by_fairness_id).values())
    return buf.getvalue()


_RELATIVE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.ASCII)
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """`1h`, `30m`, `7d` ago, or an ISO date/time (naive means UTC) -> unix time."""
    text = text.strip()
    m = _RELATIVE.fullmatch(text)
    if m:
        now = time.time() if now is None else now
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--since {text!r}: expected a relative time like 30m, 1h, 7d or an ISO date/time"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()
