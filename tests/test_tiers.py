"""The tiers (one enum, made of the core's lanes) and the tier table of
DESIGN.md, row by row."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal

import aiohttp
import orjson
import pytest
from conftest import PRIORITY_MODEL, Running
from hypothesis import given
from hypothesis import strategies as st

from tierq import Admission, TokenBucket, _core
from tierq.ledger import LedgerRow, row_values
from tierq.tiers import InvalidTier, Tier, resolve_tier

PRIORITY, DEFAULT = Tier.PRIORITY, Tier.DEFAULT


def test_tier_is_the_cores_lanes_in_lane_order() -> None:
    assert _core.TIERS == ("priority", "default", "flex")
    assert tuple(Tier) == _core.TIERS
    assert [t.name for t in Tier] == ["PRIORITY", "DEFAULT", "FLEX"]
    assert [t.lane for t in Tier] == [0, 1, 2]
    # The core's per-lane dicts come in the same order, under the same names.
    assert list(Admission().stats()["depth"]) == list(Tier)  # type: ignore[call-overload]
    assert list(_core.PoolSettings().max_wait_ms) == list(Tier)
    for tier in Tier:
        assert TokenBucket(10.0).try_take(1, tier) is None


async def test_a_waiter_of_each_tier_waits_in_the_cores_lane_of_that_name() -> None:
    adm = Admission(max_concurrency=1, queue_depth=4)
    async with adm.acquire(Tier.DEFAULT) as held:
        assert held.tier is Tier.DEFAULT
        for tier in Tier:
            waiter = asyncio.ensure_future(adm.acquire(tier).__aenter__())
            while adm.stats()["depth"][tier.value] == 0:  # type: ignore[index]
                await asyncio.sleep(0)
            assert adm.stats()["depth"] == {t.value: int(t is tier) for t in Tier}
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
    assert adm.max_wait_s(Tier.PRIORITY) == adm.max_wait_s("priority") == 60.0


def test_a_tier_is_its_plain_name_in_json_text_and_dict_lookups() -> None:
    assert Tier.PRIORITY == "priority" and Tier.DEFAULT == "default"
    assert Tier("priority") is Tier.PRIORITY
    assert f"{Tier.PRIORITY}" == str(Tier.PRIORITY) == "priority"
    assert orjson.dumps({"service_tier": Tier.DEFAULT}) == b'{"service_tier":"default"}'
    assert {"priority": 1}[Tier.PRIORITY] == 1 and {Tier.DEFAULT: 2}["default"] == 2


def test_a_ledger_row_takes_a_tiers_name_and_stores_the_plain_string() -> None:
    row = LedgerRow(request_id="r1", ts=1.0, key_id="anonymous", model="m", endpoint="/v1/chat/completions",
                    requested_tier="fast", applied_tier="priority", prompt_tokens=1,  # type: ignore[arg-type]
                    completion_tokens=1, cost=Decimal(0), status="served")
    assert row.applied_tier is Tier.PRIORITY
    stored = row_values(row)[6]
    assert stored == "priority" and type(stored) is str
    with pytest.raises(ValueError, match=r"^applied_tier must be 'priority', 'default' or 'flex', not 'scale'$"):
        LedgerRow(request_id="r2", ts=1.0, key_id="anonymous", model="m", endpoint="/v1/completions",
                  requested_tier="scale", applied_tier="scale", prompt_tokens=0,  # type: ignore[arg-type]
                  completion_tokens=0, cost=Decimal(0), status="served")


async def test_a_priority_request_echoes_logs_and_counts_the_plain_name(gateway: Running) -> None:
    body = {"model": PRIORITY_MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2, "service_tier": "priority"}
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/chat/completions", data=orjson.dumps(body),
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
            assert r.headers["x-tierq-service-tier"] == "priority"
            raw = await r.read()
            rid = r.headers["x-request-id"]
        assert b'"service_tier":"priority"' in raw
        async with s.get(gateway.root + "/status.json") as r:
            status = orjson.loads(await r.read())
        async with s.get(gateway.root + "/metrics") as r:
            metrics = await r.text()
    assert status["totals"]["priority"]["served"] == 1
    assert 'tier="priority"' in metrics and "Tier." not in metrics
    await gateway.ledger.flush()
    with sqlite3.connect(gateway.ledger.path) as conn:  # type: ignore[attr-defined]
        stored = conn.execute("SELECT applied_tier, typeof(applied_tier) FROM ledger"
                              " WHERE request_id = ?", (rid,)).fetchall()
    assert stored == [("priority", "text")]


@pytest.mark.parametrize("requested", ["priority", "fast"])
def test_priority_on_priority_model_applies_priority(requested: str) -> None:
    assert resolve_tier(requested, True) == PRIORITY


@pytest.mark.parametrize("requested", ["priority", "fast"])
def test_priority_on_non_priority_model_applies_default(requested: str) -> None:
    assert resolve_tier(requested, False) == DEFAULT


@pytest.mark.parametrize("requested", [None, "auto", "default", "flex", "scale"])
@pytest.mark.parametrize("model_priority", [True, False])
def test_absent_null_auto_default_flex_scale_apply_default(requested: object, model_priority: bool) -> None:
    assert resolve_tier(requested, model_priority) == DEFAULT


@pytest.mark.parametrize("model_priority", [True, False])
def test_flex_on_a_flex_model_applies_flex_and_nothing_else_does(model_priority: bool) -> None:
    assert resolve_tier("flex", model_priority, True) == Tier.FLEX
    for other in (None, "auto", "default", "scale"):
        assert resolve_tier(other, model_priority, True) == DEFAULT
    assert resolve_tier("priority", model_priority, True) == (PRIORITY if model_priority else DEFAULT)


@pytest.mark.parametrize(
    "requested",
    ["turbo", "", "Priority", "PRIORITY", " priority", 1, 0, 1.5, True, False, {"tier": "priority"}, ["priority"]],
)
def test_anything_else_is_invalid_and_names_the_value(requested: object) -> None:
    with pytest.raises(InvalidTier) as info:
        resolve_tier(requested, True)
    assert info.value.param == "service_tier"
    assert info.value.value == requested
    assert "service_tier" in str(info.value)


def test_invalid_tier_message_shows_value_as_json() -> None:
    with pytest.raises(InvalidTier, match=r'"turbo"'):
        resolve_tier("turbo", True)
    with pytest.raises(InvalidTier, match=r"\btrue\b"):
        resolve_tier(True, True)


def test_invalid_tier_is_a_value_error() -> None:
    assert issubclass(InvalidTier, ValueError)


@given(st.text())
def test_only_the_table_strings_are_accepted(s: str) -> None:
    if s in {"priority", "fast", "auto", "default", "flex", "scale"}:
        assert resolve_tier(s, True) in (PRIORITY, DEFAULT)
    else:
        with pytest.raises(InvalidTier):
            resolve_tier(s, True)
