"""Exact cost and its rendering as a JSON number."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierq.catalog import builtin_prices
from tierq.pricing import (FEMTO_PER_USD, Prices, cost, cost_femto, decimal_text, femto_decimal,
                           femto_per_token, femto_text, rates, render_cost, render_femto)

LLAMA_8B = Prices(Decimal("0.03"), Decimal("0.05"))


def test_default_cost_is_tokens_times_price_per_million() -> None:
    assert cost(1000, 500, LLAMA_8B, "default") == Decimal("0.000055")


def test_priority_cost_is_one_and_a_half_times_default() -> None:
    assert cost(1000, 500, LLAMA_8B, "priority") == Decimal("0.0000825")


def test_multiplier_is_configurable() -> None:
    assert cost(1_000_000, 0, LLAMA_8B, "priority", Decimal("2")) == Decimal("0.06")


def test_embeddings_bill_prompt_tokens_only() -> None:
    assert cost(7, 0, LLAMA_8B, "default") == Decimal("0.00000021")


def test_negative_tokens_are_refused() -> None:
    with pytest.raises(ValueError):
        cost(-1, 0, LLAMA_8B, "default")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("0.0000825"), "0.0000825"),
        (Decimal("0E-12"), "0"),
        (Decimal("1.50000"), "1.5"),
        (Decimal("1E+2"), "100"),
        (Decimal("0.00000000000021"), "0.00000000000021"),
    ],
)
def test_decimal_text_has_no_exponent_and_no_trailing_zeros(value: Decimal, text: str) -> None:
    assert decimal_text(value) == text


def test_render_cost_embeds_exact_digits_in_orjson_output() -> None:
    out = orjson.dumps({"usage": {"estimated_cost": render_cost(Decimal("0.0000825"))}})
    assert out == b'{"usage":{"estimated_cost":0.0000825}}'


@given(st.integers(0, 10**7), st.integers(0, 10**7), st.sampled_from(sorted(builtin_prices())),
       st.sampled_from(["priority", "default"]))
def test_cost_is_exact_and_priority_is_exactly_one_point_five_times(
    prompt: int, completion: int, model: str, tier: str
) -> None:
    prices = builtin_prices()[model]
    c = cost(prompt, completion, prices, tier)
    base = (prompt * prices.input_per_m + completion * prices.output_per_m) / Decimal(10**6)
    assert c == (base * Decimal("1.5") if tier == "priority" else base)
    # The rendered number parses back to the same decimal value.
    assert Decimal(decimal_text(c)) == c


@given(st.integers(0, 10**7), st.integers(0, 10**7), st.sampled_from(sorted(builtin_prices())),
       st.sampled_from(["priority", "default"]))
def test_integer_cost_renders_the_same_json_number_as_the_exact_decimal(
    prompt: int, completion: int, model: str, tier: str
) -> None:
    prices = builtin_prices()[model]
    femto = cost_femto(prompt, completion, rates(prices, tier))
    mult = Decimal("1.5") if tier == "priority" else Decimal(1)
    exact = (prompt * prices.input_per_m + completion * prices.output_per_m) * mult / Decimal(10**6)
    assert femto_decimal(femto) == exact and femto == exact * FEMTO_PER_USD
    assert orjson.dumps(render_femto(femto)) == orjson.dumps(render_cost(exact))
    assert femto_text(femto) == decimal_text(exact)


@pytest.mark.parametrize(("femto", "text"), [
    (0, "0"), (1, "0.000000000000001"), (10**15, "1"), (12 * 10**15, "12"),
    (82_500_000_000, "0.0000825"), (1_234_567 * 10**15 + 5 * 10**14, "1234567.5"),
])
def test_femto_text_is_plain_usd_digits(femto: int, text: str) -> None:
    assert femto_text(femto) == text


def test_a_price_finer_than_a_femto_usd_per_token_is_refused_not_rounded() -> None:
    assert femto_per_token(Decimal("0.000000001")) == 1  # 9 decimals per 1M: 1 femto-USD a token
    assert femto_per_token(Decimal("0.27"), Decimal("1.5")) == 405_000_000
    with pytest.raises(ValueError, match="femto-USD"):
        femto_per_token(Decimal("0.0000000001"))
    with pytest.raises(ValueError, match="femto-USD"):
        femto_per_token(Decimal("0.000000001"), Decimal("1.5"))  # 1.5 femto-USD
