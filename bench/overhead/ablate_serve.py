"""`tierq serve` with parts of the request path replaced by no-ops, for
bench/overhead/ablate.py to measure what each part costs. An experiment only:
nothing here is a configuration tierq offers (the ledger, for one, is not optional).

    python ablate_serve.py OFF[,OFF...] -- <tierq serve arguments>

OFF: `ledger` (rows are dropped, nothing is committed or awaited; on the
Finisher's path, `Ledger.finish_nowait`, the key is still settled and the
access line still written, formatted in Python as for a line the core leaves
to it), `metrics`
(observations dropped), `none`. Access logs and API keys are switched off with
tierq's own `--no-access-log` and config instead.
"""

from __future__ import annotations

import sys
from typing import Any


def _patch(off: set[str]) -> None:
    if "ledger" in off:
        from tierq.keys import KeyLimiter
        from tierq.ledger import Ledger

        async def record(self: Ledger, row: Any) -> None:
            return None

        def record_nowait(self: Ledger, row: Any) -> None:
            return None

        def finish_nowait(self: Ledger, fields: Any, settle: Any, access: Any) -> tuple[int, None]:
            # The Finisher's other two jobs stay: the key's settlement, and the
            # access line (None: tierq.logs formats it from the row's fields).
            KeyLimiter.apply(settle)
            return 0, None

        async def committed(self: Ledger, seq: int) -> None:
            return None

        Ledger.record = record  # type: ignore[method-assign]
        Ledger.record_nowait = record_nowait  # type: ignore[method-assign]
        Ledger.finish_nowait = finish_nowait  # type: ignore[method-assign]
        Ledger.committed = committed  # type: ignore[method-assign]
    if "metrics" in off:
        from tierq.metrics import GatewayMetrics

        def observe(self: GatewayMetrics, *args: Any) -> None:
            return None

        GatewayMetrics.observe = observe  # type: ignore[method-assign]


def main() -> int:
    off = {x for x in sys.argv[1].split(",") if x and x != "none"}
    unknown = off - {"ledger", "metrics"}
    if unknown or sys.argv[2] != "--":
        sys.exit(f"usage: {sys.argv[0]} ledger,metrics|none -- <tierq serve args> ({unknown or ''})")
    _patch(off)
    from tierq.cli import main as tierq_main

    return tierq_main(["serve", *sys.argv[3:]])


if __name__ == "__main__":
    sys.exit(main())
