"""How one request ended, decided in one place.

Every request that passes intake ends in exactly one `Outcome`: served,
partial, shed, failed or cancelled, with its code. `Exchange.finish` (or
`commit`, which also waits for the bill to be durable) turns it into the four
things that must agree: the ledger row, the metrics, the access line and the
settlement of the key's per-minute limits (DESIGN.md, Admission semantics).
A request turned away before its response began is raised as `Refused` (its
outcome and its OpenAI error together) and finished by `Exchange.refuse`, in
the handler's one wrapper (tierq.app); the relays record the ends that happen
once the response has begun (served, partial, cut short, broken):

- served or partial: the key is charged its real usage;
- anything else: its whole token estimate is given back, and its request too
  when the gateway caused it (a pool shed, an upstream failure, a drain), not
  the client (its own rate limit, a hang-up, a request the engine refused).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial as _partial
from decimal import Decimal
from typing import Any, Final

from aiohttp import web

from tierq.admission import Slot
from tierq.errors import (CLUSTER_DOWN_CODE, JSON_TYPE, SHED_MESSAGES, ApiError, cluster_down_error,
                          drain_error, shed_error)
from tierq.downgrades import Hold
from tierq.gateway import Gateway, Pool
from tierq.intake import ANONYMOUS_FLOW, ENDPOINT_PATHS, Flow
from tierq.keys import NO_SETTLEMENT, KeyInfo, KeyLimiter, KeyRefusal, Settlement
from tierq.ledger import Ledger, LedgerRow
from tierq.logs import RequestInfo, access_enabled, access_fields, access_formatted, access_line
from tierq.pricing import cost_femto, fair_charge, femto_decimal
from tierq.shadow import DOWNGRADES, KEY_REFUSALS, RATE_LIMITED
from tierq.tiers import Tier, TierReason
from tierq.tracing import Ended, TraceContext

__all__ = [
    "QUEUE_HEADER",
    "REASON_HEADER",
    "TIER_HEADER",
    "Exchange",
    "Outcome",
    "Refused",
    "cancelled",
    "cluster_refused",
    "deadline_refused",
    "drained",
    "failed",
    "key_refused",
    "partial",
    "pool_shed",
    "served",
    "shed",
    "upstream_overloaded",
]

TIER_HEADER: Final = "x-tierq-service-tier"
# Set only on a downgrade: why the request was served below the tier it asked for.
REASON_HEADER: Final = "x-tierq-service-tier-reason"
QUEUE_HEADER: Final = "x-tierq-queue-ms"
CLIENT_CLOSED: Final = 499  # nginx's "client closed request": the access line's status
DRAIN_CODE: Final = "server_shutting_down"
# An engine's 4xx that the request itself caused (a bad parameter, a prompt too
# long): the client's doing, so its request stays counted. Any other upstream
# error status (401/403 credentials, 404 routing, 408/429 load) is the gateway's.
_CLIENT_FAULTS: Final = frozenset({400, 413, 422})


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a request ended: what its row says and what its key is charged."""

    status: str  # the ledger's: served | shed | failed | cancelled
    code: str | None
    http_status: int  # what the client was answered (for the access line)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    billed: bool = False  # priced from its tokens and settled to them (served, partial)
    partial: bool = False
    by_gateway: bool = False  # the gateway caused it: the key's request is given back
    cost: int | None = None  # femto-USD: the price already computed for the answer, if billed


def served(prompt: int, completion: int, code: str | None = None, *,
           cost: int | None = None) -> Outcome:
    """A complete answer (`code` "usage_estimated" when the upstream reported no usage);
    `cost`: its price in femto-USD when the answer already carries it."""
    return Outcome("served", code, 200, prompt, completion, billed=True, cost=cost)


def partial(prompt: int, completion: int, code: str, http_status: int = 200) -> Outcome:
    """A stream cut short after tokens reached the client: billed for what was delivered."""
    return Outcome("cancelled", code, http_status, prompt, completion, billed=True, partial=True)


def shed(code: str) -> Outcome:
    """Refused by the pool (overloaded, queue timeout, its rate) or by a drain."""
    return Outcome("shed", code, 503 if code == DRAIN_CODE else 429, by_gateway=True)


def failed(code: str, http_status: int = 502, *, prompt: int = 0, completion: int = 0,
           delivered: bool = False, upstream_status: int | None = None) -> Outcome:
    """The upstream failed (or answered something unusable): nothing is billed.

    A stream broken after some tokens were `delivered` is marked partial with
    them; an engine's refusal of the request itself (`upstream_status` 400, 413,
    422) is the client's doing, every other failure the gateway's.
    """
    return Outcome("failed", code, http_status, prompt, completion, partial=delivered,
                   by_gateway=upstream_status not in _CLIENT_FAULTS)


def cancelled(code: str, http_status: int = CLIENT_CLOSED) -> Outcome:
    """Nothing usable reached the client: it hung up or stopped reading, or a drain cut it."""
    return Outcome("cancelled", code, http_status, by_gateway=code == DRAIN_CODE)


class Refused(Exception):
    """A request turned away before its response began: how it ended (`outcome`,
    for its row, metrics and key) and what the client is told (`error`, whose
    headers hold the refusal's own, such as its retry hints). Raised anywhere past
    intake; `Exchange.refuse` finishes the request with it, in one place."""

    def __init__(self, outcome: Outcome, error: ApiError) -> None:
        super().__init__(error.message)
        self.outcome = outcome
        self.error = error


# A flex request shed for want of idle capacity: nothing else is the matter.
FLEX_UNAVAILABLE: Final = "resource_unavailable"
_NO_IDLE_CAPACITY: Final = frozenset({"server_overloaded", "queue_timeout"})


def pool_shed(code: str, retry_after_s: float, tier: Tier = Tier.DEFAULT) -> Refused:
    """Shed by the pool's admission (queue full, waited too long, its rate).
    A flex request that found no idle capacity (evicted, queue full, or past
    its max wait) is told `resource_unavailable`, as OpenAI's flex tier says."""
    if tier == Tier.FLEX and code in _NO_IDLE_CAPACITY:
        code = FLEX_UNAVAILABLE
    return Refused(shed(code), shed_error(code, retry_after_s,
                                          SHED_MESSAGES.get(code, "Request shed.")))


def deadline_refused(predicted_s: float | None, deadline_ms: int | None,
                     retry_after_s: float, tier: Tier = Tier.DEFAULT) -> Refused:
    """Refused on arrival: the core predicted a wait in line over the request's
    own deadline (x-tierq-max-queue-ms), so it was not made to wait it out (a
    flex request: no idle capacity in time, `resource_unavailable`)."""
    predicted = "unknown" if predicted_s is None else f"{predicted_s * 1000:.0f} ms"
    code = FLEX_UNAVAILABLE if tier == Tier.FLEX else "queue_timeout"
    return Refused(shed(code), shed_error(
        code, retry_after_s,
        f"The predicted wait in the queue ({predicted}) is over this request's "
        f"x-tierq-max-queue-ms ({deadline_ms} ms): refused at once, without waiting."))


def upstream_overloaded(retry_after_s: float) -> Refused:
    """The upstream still said 429/503 when the request's wait ran out: tierq's
    own shed (server_overloaded, the pool's honest Retry-After), no charge."""
    return Refused(shed("upstream_overloaded"),
                   shed_error("server_overloaded", retry_after_s, SHED_MESSAGES["server_overloaded"]))


def key_refused(wait_s: float) -> Refused:
    """Refused by the key's own per-minute limits (which charged nothing)."""
    return Refused(Outcome("shed", "rate_limit_exceeded", 429),
                   shed_error("rate_limit_exceeded", wait_s, "Rate limit reached for this API "
                              "key (requests or tokens per minute)."))


def cluster_refused(retry_after_s: float) -> Refused:
    """Refused because the cluster's Redis is unreachable (on_redis_down = "closed")."""
    return Refused(Outcome("shed", CLUSTER_DOWN_CODE, 503, by_gateway=True),
                   cluster_down_error(retry_after_s))


def drained() -> Refused:
    """Shed because the gateway is shutting down (before or while queued)."""
    return Refused(shed(DRAIN_CODE), drain_error())


@dataclass(slots=True)
class Exchange:
    """One request as the gateway handles it, from intake to its outcome."""

    gw: Gateway
    request: web.Request
    info: RequestInfo
    key: KeyInfo | None
    key_id: str
    pool: Pool
    endpoint: str
    requested_tier: str | None  # as the client wrote it (None: absent)
    tier: Tier  # applied (tierq.tiers.resolve_tier, then downgrades): echoed, queued, billed
    t0: float
    ts: float
    est_prompt: int
    est_total: int
    flow: Flow = ANONYMOUS_FLOW  # whom it is fair against (tierq.intake.flow_of)
    max_queue_ms: int | None = None  # its own deadline in line (x-tierq-max-queue-ms)
    slot: Slot | None = None  # the admission step's, once it began (its queue time)
    ttft_s: float | None = None  # first token delivered (streams), from t0
    charged: bool = False  # the key's limits took this request and its estimate
    # What the key's limits in shadow mode decided and did not apply (tierq.shadow);
    # the pool's rate limit's is the slot's (`shadow_decisions`).
    shadow: tuple[str, ...] = ()
    outcome: Outcome | None = None
    # A downgrade (`tier` lowered by its key's ramp or budget): why, for the
    # header and the row; and what a priority request counted of them.
    reason: TierReason | None = None
    hold: Hold | None = None

    sent_at: float = 0.0  # when the request last went upstream (monotonic)
    # [tracing]: its trace context (None when tracing is off), and for its spans
    # when it joined its lane and left it, what the upstream said its model was,
    # and when it first went upstream (monotonic; 0.0: never).
    trace: TraceContext | None = None
    queued_at: float = 0.0
    admitted_at: float = 0.0
    response_model: str | None = None
    upstream_at: float = 0.0
    # Which of the upstream's endpoints it was sent to (tierq.routing).
    replica: int = 0
    # Whether any byte of the response reached the client (its headers
    # included): until then a failed try may be sent again (tierq.app).
    replied: bool = False

    @property
    def done(self) -> bool:
        return self.outcome is not None

    @property
    def max_wait_s(self) -> float:
        """The longest it may wait in line: its lane's max wait, or its own
        deadline if shorter (never longer)."""
        lane = self.pool.admission.max_wait_s(self.tier)
        return lane if self.max_queue_ms is None else min(lane, self.max_queue_ms / 1000)

    @property
    def deadline_ms(self) -> int | None:
        """Its own deadline as the core takes it (whole ms): its header's value, or
        the lane's max wait when that is shorter; None without the header, or when
        the lane's wait is under a millisecond (a deadline never extends it)."""
        if self.max_queue_ms is None:
            return None
        lane_ms = self.pool.admission.max_wait_s(self.tier) * 1000
        if self.max_queue_ms < lane_ms:
            return self.max_queue_ms
        return int(lane_ms) if lane_ms >= 1 else None

    @property
    def charge(self) -> int:
        """Its estimated service for fair queuing (tierq.pricing.fair_charge)."""
        return fair_charge(self.est_prompt, self.est_total - self.est_prompt,
                           self.pool.entry.rates[Tier.DEFAULT])

    @property
    def queue_ms(self) -> float:
        """The time it waited in its pool's lane, as admission stamped it."""
        return self.slot.queue_ms if self.slot is not None else 0.0

    def cost(self, prompt: int, completion: int) -> int:
        """The exact price of `prompt` and `completion` tokens here, in femto-USD."""
        return cost_femto(prompt, completion, self.pool.entry.rates[self.tier])

    def headers(self, content_type: str = JSON_TYPE) -> dict[str, str]:
        """The response's headers, built once per response: the tier echo, the
        queue time, both request ids and the Content-Type (so aiohttp sets none
        of its own); callers add theirs to this same dict."""
        # x-request-id echoes the client's id when it sent one; the gateway's own
        # (the ledger's request_id) is always in x-tierq-request-id.
        headers = {"Content-Type": content_type, TIER_HEADER: self.tier,
                   QUEUE_HEADER: f"{self.queue_ms:.3f}", "x-request-id": self.info.echo,
                   "x-tierq-request-id": self.info.id}
        if self.reason is not None:
            headers[REASON_HEADER] = self.reason
        return headers

    @property
    def request_id(self) -> str:
        return self.info.id

    def admit_key(self) -> float | None:
        """Charge the key's limits for this request: None if admitted, else the
        seconds until it would be (then nothing was charged)."""
        limiter, key = self.gw.limiter, self.key
        if limiter is None or key is None:
            return None
        return self._keyed(key, limiter.decide(key, self.est_total))

    async def admit_key_shared(self) -> float | None:
        """`admit_key` against the cluster's limits ([cluster]: one Redis round
        trip). Raises ClusterUnavailable when Redis is down in "closed" mode."""
        cluster, key = self.gw.cluster, self.key
        if cluster is None or key is None or self.gw.limiter is None:
            return self.admit_key()
        return self._keyed(key, await cluster.decide_key(key, self.est_total))

    def _keyed(self, key: KeyInfo, refused: KeyRefusal | None) -> float | None:
        """The key limits' decision applied, or only recorded when the key's
        limits are in shadow mode: then it goes on uncharged, the buckets left as
        the refusal left them (as enforcing would)."""
        self.charged = refused is None
        if refused is None:
            return None
        if key.enforce:
            return refused.wait_s
        self.shadow += (refused.decision,)
        return None

    @property
    def key_shadow_refused(self) -> bool:
        """A key limit in shadow mode refused it (rpm or tpm), not applied."""
        return any(d in KEY_REFUSALS for d in self.shadow)

    @property
    def shadow_decisions(self) -> tuple[str, ...]:
        """Every decision a limit in shadow mode made for it and did not apply:
        the key's, then the pool's rate limit's."""
        slot = self.slot
        if slot is not None and slot.shadowed is not None:
            return (*self.shadow, RATE_LIMITED)
        return self.shadow

    def downgrade(self) -> None:
        """The key's ramp rule and priority budget applied to the tier, before
        admission (tierq.downgrades): a downgraded request is queued, echoed,
        billed and recorded as default, with its reason."""
        downgrades = self.gw.downgrades
        if downgrades is None or self.key_shadow_refused:
            return  # a key limit refused it in shadow: enforcing, it never came here
        self._downgraded(*downgrades.decide(self.key, self.tier, self.est_total,
                                            self._priority_estimate))

    async def downgrade_shared(self) -> None:
        """`downgrade` against the cluster's counts ([cluster]: one Redis round
        trip for a key with a ramp rule or a budget). Raises ClusterUnavailable
        when Redis is down in "closed" mode."""
        cluster = self.gw.cluster
        if cluster is None:
            self.downgrade()
            return
        if self.gw.downgrades is None or self.key_shadow_refused:
            return
        self._downgraded(*await cluster.downgrades.decide(self.key, self.tier, self.est_total,
                                                          self._priority_estimate))

    @property
    def _priority_estimate(self) -> int:
        """Its estimated cost at the priority rate, in femto-USD (the budget's charge)."""
        return cost_femto(self.est_prompt, self.est_total - self.est_prompt,
                          self.pool.entry.rates[Tier.PRIORITY])

    def _downgraded(self, tier: Tier, reason: TierReason | None, hold: Hold | None) -> None:
        """The downgrades' decision applied, or only recorded when the key is in shadow mode."""
        if reason is not None and self.key is not None and not self.key.enforce:
            # Shadow mode: counted, not applied. A downgrade counts nothing in the
            # ramp step or the day's budget, so served as asked it counts nothing
            # either, and the counters stand where enforcing leaves them.
            self.shadow += (DOWNGRADES[reason],)
            return
        self.tier, self.reason, self.hold = tier, reason, hold

    def finish(self, outcome: Outcome) -> None:
        """Record `outcome` (the row queued, not awaited): metrics, access line, key.

        A request has one outcome: `done` is set before anything else, so a
        cancellation arriving while the row's commit is awaited finds it set
        and adds no second row.
        """
        assert self.outcome is None, (self.outcome, outcome)
        self.outcome = outcome
        ended = self._end(outcome)
        if isinstance(ended, LedgerRow):
            self.gw.ledger.record_nowait(ended)

    def refuse(self, refused: Refused) -> ApiError:
        """`finish` with a refusal's outcome; returns its error to raise, with this
        response's headers (tier, queue time, request ids) ahead of its own."""
        self.finish(refused.outcome)
        err = refused.error
        headers = self.headers()
        headers.update(err.headers)
        err.headers = headers
        return err

    async def commit(self, outcome: Outcome) -> None:
        """`finish`, returning once the row is committed: a served response's
        last bytes wait for it."""
        assert self.outcome is None, (self.outcome, outcome)
        self.outcome = outcome
        ended = self._end(outcome)
        if isinstance(ended, LedgerRow):
            await self.gw.ledger.record(ended)
        else:
            ledger = self.gw.ledger
            assert isinstance(ledger, Ledger)
            await ledger.committed(ended)

    def _end(self, o: Outcome) -> LedgerRow | int:
        """Everything `o` ends in but the wait for its row: the row and the key's
        settlement (and the access line, formatted from the row) in one core call
        with the SQLite ledger (tierq._core.Finisher), returning the row's sequence
        number; with any other ledger, the row to record, the key settled here.
        The metrics, the spans and the fair order's correction are Python's either way."""
        end = time.monotonic()
        latency_s = end - self.t0
        upstream = self.pool.upstream.name
        model = self.pool.entry.id
        femto = ((o.cost if o.cost is not None else self.cost(o.prompt_tokens, o.completion_tokens))
                 if o.billed else 0)
        queue_ms = self.queue_ms
        shadow = self.shadow_decisions
        # LedgerRow._params()'s order: the Finisher's and the writer's arguments.
        fields = (self.info.id, self.ts, self.key_id, model, ENDPOINT_PATHS[self.endpoint],
                  self.requested_tier, self.tier.value, o.prompt_tokens, o.completion_tokens,
                  femto, o.status, o.partial, o.code, queue_ms, latency_s * 1000.0, upstream,
                  self.flow.fairness_id, self.reason)
        ledger = self.gw.ledger
        ended: LedgerRow | int
        if isinstance(ledger, Ledger):
            access = (access_fields(self.request, self.info, o.http_status, latency_s, shadow)
                      if access_enabled() else None)
            ended, line = ledger.finish_nowait(fields, self._settlement(o), access)
            if access is not None:
                access_formatted(self.info, access, _partial(_ledger_row, fields), shadow, line)
        else:
            row = ended = _ledger_row(fields)
            KeyLimiter.apply(self._settlement(o))
            if access_enabled():
                access_line(self.request, self.info, o.http_status, latency_s, row, shadow)
        self.gw.metrics.observe(model, upstream, self.tier, o.status, o.code,
                                queue_ms / 1000.0, latency_s,
                                self.ttft_s if self.ttft_s is not None else latency_s, femto)
        if shadow:
            self.gw.metrics.observe_shadow(shadow)
        if self.reason is not None:
            self.gw.metrics.observe_downgrade(model, self.reason)
        if self.trace is not None and self.trace.sampled:
            self._traced(o, femto, end)
        if self.hold is not None:
            self._settle_hold(o, femto)
        if o.billed:
            self._served(o)
        return ended

    def _traced(self, o: Outcome, femto: int, end: float) -> None:
        """The request's spans, as plain values for the exporter thread."""
        tracer = self.gw.tracer
        assert tracer is not None and self.trace is not None
        up = self.pool.upstream
        tracer.end(Ended(
            self.trace, self.endpoint, up.config.kind, self.pool.entry.id,
            self.pool.entry.upstream_model, self.response_model, self.requested_tier, self.tier,
            o.status, o.code, o.http_status, o.prompt_tokens, o.completion_tokens, o.billed, femto,
            self.ttft_s, self.queue_ms, self.pool.admission.limit, self.info.id, up.name,
            up.endpoints[self.replica], self.t0, self.ts, self.queued_at, self.admitted_at, self.upstream_at, end,
            self.reason))

    def _served(self, o: Outcome) -> None:
        """The real service of a served or partial request: the core's fair
        order corrected from its estimate, and the flow's line on /status."""
        tokens = o.prompt_tokens + o.completion_tokens
        charge = fair_charge(o.prompt_tokens, o.completion_tokens,
                             self.pool.entry.rates[Tier.DEFAULT])
        if self.slot is not None:
            self.slot.settle(charge)
        self.pool.flows.served(self.flow.name, tokens, charge, self.flow.weight)

    def _settle_hold(self, o: Outcome, femto: int) -> None:
        """The ramp and budget counts of a request served priority: its real
        tokens and cost, or all given back when nothing was billed."""
        key, hold = self.key, self.hold
        downgrades = self.gw.cluster.downgrades if self.gw.cluster is not None else self.gw.downgrades
        assert downgrades is not None and key is not None and hold is not None
        if o.billed:
            downgrades.settle(key, hold, o.prompt_tokens + o.completion_tokens, femto)
        else:
            downgrades.refund(key, hold)

    def _settlement(self, o: Outcome) -> Settlement:
        """What the key's limits are to move for `o` (tierq.keys.KeyLimiter.settlement),
        applied by the caller; a [cluster] key's is settled here, in Redis."""
        limiter, key = self.gw.limiter, self.key
        if not self.charged or limiter is None or key is None:
            return NO_SETTLEMENT  # no limits, or the key's own limit refused it: nothing was taken
        if self.slot is not None and self.slot.shadowed is not None:
            o = shed(self.slot.shadowed)  # see `rate_shadowed`
        return self._key_settlement(key, o)

    def rate_shadowed(self) -> None:
        """Once admitted: if the pool's rate limit refused it in shadow mode, its
        key gets back now what that shed would have given back (its request and
        its estimate: the gateway's doing), so the key's buckets stand where
        enforcing leaves them; nothing more is settled for it."""
        limiter, key = self.gw.limiter, self.key
        if (self.slot is None or self.slot.shadowed is None or not self.charged
                or limiter is None or key is None):
            return
        self.charged = False
        KeyLimiter.apply(self._key_settlement(key, shed(self.slot.shadowed)))

    def _key_settlement(self, key: KeyInfo, o: Outcome) -> Settlement:
        limiter = self.gw.limiter
        assert limiter is not None
        cluster = self.gw.cluster
        if cluster is not None:
            if o.billed:
                cluster.settle_key(key, self.est_total, o.prompt_tokens + o.completion_tokens)
            else:
                cluster.refund_key(key, self.est_total, request=o.by_gateway)
            return NO_SETTLEMENT
        return limiter.settlement(key, self.est_total,
                                  o.prompt_tokens + o.completion_tokens if o.billed else None,
                                  request=o.by_gateway)


def _ledger_row(fields: tuple[Any, ...]) -> LedgerRow:
    """The LedgerRow of the Finisher's `fields` (its cost in femto-USD)."""
    (request_id, ts, key_id, model, endpoint, requested_tier, applied_tier, prompt, completion,
     femto, status, partial, code, queue_ms, latency_ms, upstream, fairness_id, reason) = fields
    return LedgerRow(
        request_id=request_id, ts=ts, key_id=key_id, model=model, endpoint=endpoint,
        requested_tier=requested_tier, applied_tier=applied_tier, prompt_tokens=prompt,
        completion_tokens=completion, cost=femto_decimal(femto) if femto else Decimal(0),
        status=status, partial=partial, code=code, queue_ms=queue_ms, latency_ms=latency_ms,
        upstream=upstream, fairness_id=fairness_id, tier_reason=reason)
