"""Downgrades through real sockets with the official openai client, on a manual
clock: a key's priority budget and its ramp rule serve priority requests as
default, and the echo (every JSON body and SSE chunk), the
x-tierq-service-tier-reason header, the ledger row and its price agree; the
budget turns with the UTC day and is rebuilt from the ledger at a restart; a ramp
regains priority as its rate settles."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from conftest import PRIORITY_MODEL, GatewayFactory, Running, model_config

from tierq._core import ManualClock
from tierq.config import Config, KeysConfig, LedgerConfig, UpstreamConfig
from tierq.downgrades import DAY_S, STEP_S, Downgrades, nano_usd
from tierq.pricing import cost_femto, femto_decimal
from tierq.tiers import Tier, TierReason

# A Unix time at the start of a UTC day (2026-12-07T00:00:00Z).
T0 = 1_796_601_600.0


def _config(tmp_path: Path) -> Config:
    return Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'unused.db'}"),
                  upstreams=(UpstreamConfig("sim", "", "sim"),),
                  models=(model_config(PRIORITY_MODEL),),
                  keys=KeysConfig(path=str(tmp_path / "keys.db")))


def _manual(running: Running) -> ManualClock:
    """The gateway's downgrades on a manual clock starting at T0."""
    clock = ManualClock(0)
    running.gw.downgrades = Downgrades(clock=lambda: T0 + clock.now_ns() / 1e9)
    return clock


async def _ask(running: Running, token: str, *, stream: bool = False) -> tuple[str, str | None]:
    """One priority request: (the tier echoed, the reason header); checks that
    every chunk echoes the same tier and that the ledger row agrees, priced at it."""
    async with openai.AsyncOpenAI(base_url=running.url, api_key=token, max_retries=0) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model=PRIORITY_MODEL, messages=[{"role": "user", "content": "hello there"}],
            max_tokens=8, service_tier="priority", stream=stream,
            **({"stream_options": {"include_usage": True}} if stream else {}))
        if stream:
            tiers = {chunk.service_tier async for chunk in raw.parse()}
            assert len(tiers) == 1, tiers
            echoed = tiers.pop()
        else:
            echoed = raw.parse().service_tier
    headers = raw.headers
    tier, reason = headers["x-tierq-service-tier"], headers.get("x-tierq-service-tier-reason")
    assert echoed == tier
    row = running.ledger.get(headers["x-tierq-request-id"])
    assert row is not None and row.applied_tier == tier and row.tier_reason == reason
    assert row.requested_tier == "priority" and row.status == "served"
    rates = running.gw.pools[PRIORITY_MODEL].entry.rates[Tier(tier)]
    assert row.cost == femto_decimal(cost_femto(row.prompt_tokens, row.completion_tokens, rates))
    assert (reason is None) == (tier == "priority")
    return tier, reason


async def test_a_spent_budget_serves_default_until_the_utc_day_turns_and_a_restart_keeps_it(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    running = await make_gateway(config=_config(tmp_path))
    clock = _manual(running)
    keys, downgrades = running.gw.keys, running.gw.downgrades
    assert keys is not None and downgrades is not None
    info, token = keys.create("budgeted", priority_budget_usd="10")
    assert await _ask(running, token) == ("priority", None)
    first = running.ledger.rows()[-1]
    spent = downgrades.spent_nano(info.public_id)
    assert spent == nano_usd(int(first.cost.scaleb(15))), "settled to the real cost"
    # A restart rebuilds the day's spend from the ledger.
    fresh = Downgrades(clock=lambda: T0 + clock.now_ns() / 1e9)
    fresh.rebuild((line.key_id, line.cost) for line in running.ledger.usage(since=T0)
                  if line.applied_tier == Tier.PRIORITY)
    assert fresh.spent_nano(info.public_id) == spent
    running.gw.downgrades = fresh
    # The rest of the day's budget spent (as the ledger of a busy day would say).
    fresh.rebuild([(info.public_id, Decimal("10"))])  # raised to at least: never added twice
    assert fresh.spent_nano(info.public_id) == 10 * 10**9
    assert await _ask(running, token) == ("default", "budget")
    assert await _ask(running, token, stream=True) == ("default", "budget")
    assert fresh.spent_nano(info.public_id) == 10 * 10**9, "a downgrade spends nothing"
    clock.advance(DAY_S)  # midnight UTC: a new day's budget
    assert await _ask(running, token) == ("priority", None)
    # Another key, without a budget, is never downgraded.
    _, other = keys.create("free")
    assert await _ask(running, other) == ("priority", None)
    rows = running.ledger.rows()
    assert [r.tier_reason for r in rows] == [None, "budget", "budget", None, None]
    # Counted in /metrics and /status.json, per model and reason.
    async with aiohttp.ClientSession() as s:
        async with s.get(running.root + "/metrics") as r:
            text = await r.text()
        async with s.get(running.root + "/status.json") as r:
            status = await r.json()
    assert f'tierq_downgrades_total{{model="{PRIORITY_MODEL}",reason="budget"}} 2\n' in text
    assert 'reason="ramp"' not in text
    assert status["downgrades"] == {"ramp": 0, "budget": 2,
                                    "models": {PRIORITY_MODEL: {"ramp": 0, "budget": 2}}}
    assert [r.applied_tier for r in rows] == ["priority", "default", "default", "priority",
                                              "priority"]


async def test_a_zero_budget_never_serves_priority(make_gateway: GatewayFactory,
                                                   tmp_path: Path) -> None:
    running = await make_gateway(config=_config(tmp_path))
    _manual(running)
    assert running.gw.keys is not None
    _, token = running.gw.keys.create("none", priority_budget_usd=0)
    assert await _ask(running, token, stream=True) == ("default", "budget")


async def test_a_ramp_past_its_growth_is_served_default_and_regains_priority_as_it_settles(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    running = await make_gateway(config=_config(tmp_path))
    clock = _manual(running)
    assert running.gw.keys is not None
    # One request is estimated at ~11 tokens and uses ~10; a floor of 60 tokens
    # a minute lets about 5 through, and each minute may carry 1.5x the last.
    info, token = running.gw.keys.create("ramping", ramp_min_tpm=60, ramp_max_growth=0.5,
                                         ramp_window_s=60)
    served: list[int] = []
    for minute in range(5):
        got: list[tuple[str, str | None]] = [await _ask(running, token) for _ in range(12)]
        served.append(sum(1 for tier, _ in got if tier == "priority"))
        assert {reason for _, reason in got} <= {None, "ramp"}
        # The excess is the tail of the minute: once past the rule, the rest too.
        tiers = [tier for tier, _ in got]
        assert tiers == sorted(tiers, key=lambda t: t != "priority"), (minute, tiers)
        clock.advance(STEP_S)
    assert 1 <= served[0] < 12, served
    assert served == sorted(served), f"priority regained as the rate settles: {served}"
    assert served[-1] == 12, served
    rows = running.ledger.rows()
    assert sum(1 for r in rows if r.tier_reason == "ramp") == 60 - sum(served)


@pytest.mark.parametrize("changes", [{"ramp_max_growth": 0}, {"priority_budget_usd": -1}])
def test_bad_downgrade_settings_never_reach_a_key(tmp_path: Path, changes: dict[str, Any]) -> None:
    from tierq.keys import KeyStore
    with KeyStore(str(tmp_path / "k.db")) as store, pytest.raises(
            ValueError, match=f"^{next(iter(changes))} "):
        store.create("bad", **changes)


def test_two_workers_on_one_key_table_share_one_budget_and_one_ramp_exactly() -> None:
    """`tierq serve --workers N`: each worker's Downgrades on the host's key table
    (attached as a worker attaches it) counts into the same words."""
    import os

    from tierq._core import SharedKeyBuckets
    from tierq.keys import validate_new_key
    name = f"/tierq-test-downgrades-{os.getpid()}"
    table = SharedKeyBuckets.create(name, 64)
    try:
        now = [T0]
        workers = [Downgrades(shared=SharedKeyBuckets.attach(name), clock=lambda: now[0])
                   for _ in range(2)]
        key = validate_new_key("k", None, None, priority_budget_usd=Decimal("0.00001"),
                               ramp_min_tpm=100, ramp_max_growth=0.5, ramp_window_s=60)
        key = dataclasses.replace(key, public_id="sharedkey001")
        # The ramp's floor of 100 tokens a minute (10 each) lets ten through between
        # the two workers, whichever takes them; the ramp is checked first.
        got = [workers[i % 2].decide(key, Tier.PRIORITY, 10, 10**9) for i in range(14)]
        assert [t for t, _, _ in got] == [Tier.PRIORITY] * 10 + [Tier.DEFAULT] * 4
        assert {r for _, r, _ in got[10:]} == {TierReason.RAMP}
        # The next minute (its allowance 150 from the 100 just served): the budget,
        # 10,000 nano-USD at 1,000 an estimate, is what is left: all of it was spent.
        now[0] += STEP_S
        assert workers[1].decide(key, Tier.PRIORITY, 10, 10**9)[1] is TierReason.BUDGET
        assert workers[0].spent_nano("sharedkey001") == workers[1].spent_nano("sharedkey001")
        assert workers[1].spent_nano("sharedkey001") == 10 * 1000
        hold = got[0][2]
        assert hold is not None
        workers[1].refund(key, hold)  # a request of worker 0 given back by worker 1's table
        assert workers[0].spent_nano("sharedkey001") == 9 * 1000
    finally:
        del table
        SharedKeyBuckets.unlink(name)
