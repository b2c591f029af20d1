"""One request's bookkeeping: its ids, pool, tier and estimates, the headers
every answer carries, and the row that records how it ended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from tierq.gateway import Gateway, Pool
from tierq.intake import ENDPOINT_PATHS
from tierq.keys import KeyInfo
from tierq.ledger import LedgerRow
from tierq.logs import RequestInfo
from tierq.pricing import cost as price_cost

__all__ = ["QUEUE_HEADER", "TIER_HEADER", "Exchange"]

TIER_HEADER: Final = "x-tierq-service-tier"
QUEUE_HEADER: Final = "x-tierq-queue-ms"


@dataclass(slots=True)
class Exchange:
    """One request as the gateway handles it: what its ledger row is made from."""

    gw: Gateway
    request_id: str
    key: KeyInfo | None
    key_id: str
    pool: Pool
    endpoint: str
    requested_tier: str | None
    tier: str
    t0: float
    ts: float
    est_prompt: int
    est_total: int
    info: RequestInfo
    queue_ms: float = 0.0
    recorded: bool = False
    ttft_s: float | None = None  # first token delivered (streams), from t0

    def cost(self, prompt: int, completion: int) -> Decimal:
        return price_cost(prompt, completion, self.pool.entry.prices, self.tier,
                          self.gw.config.pricing.priority_multiplier)

    def row(self, status: str, prompt: int = 0, completion: int = 0, cost: Decimal | None = None,
            *, partial: bool = False, code: str | None = None) -> LedgerRow:
        # Marked before the write is even queued: a cancellation arriving while
        # `record` is awaited must not add a second row for the same request.
        self.recorded = True
        latency_s = time.monotonic() - self.t0
        row = LedgerRow(
            request_id=self.request_id, ts=self.ts, key_id=self.key_id,
            model=self.pool.entry.id, endpoint=ENDPOINT_PATHS[self.endpoint],
            requested_tier=self.requested_tier, applied_tier=self.tier,
            prompt_tokens=prompt, completion_tokens=completion,
            cost=cost if cost is not None else Decimal(0), status=status, partial=partial,
            code=code, queue_ms=self.queue_ms,
            latency_ms=latency_s * 1000.0, upstream=self.pool.upstream.name,
        )
        # The same decision feeds /metrics and the access log line.
        self.info.row = row
        self.gw.metrics.observe(row.model, self.pool.upstream.name, self.tier, status, code,
                                self.queue_ms / 1000.0, latency_s,
                                self.ttft_s if self.ttft_s is not None else latency_s)
        return row

    def record_nowait(self, row: LedgerRow) -> None:
        assert self.gw.ledger is not None
        self.gw.ledger.record_nowait(row)

    async def record(self, row: LedgerRow) -> None:
        assert self.gw.ledger is not None
        await self.gw.ledger.record(row)

    def headers(self) -> dict[str, str]:
        # x-request-id echoes the client's id when it sent one; the gateway's own
        # (the ledger's request_id) is always in x-tierq-request-id.
        return {TIER_HEADER: self.tier, QUEUE_HEADER: f"{self.queue_ms:.3f}",
                "x-request-id": self.info.echo, "x-tierq-request-id": self.request_id}

    def settle(self, real_total: int) -> None:
        if self.gw.limiter is not None and self.key is not None:
            self.gw.limiter.settle(self.key, self.est_total, real_total)
