"""Exact cost and its rendering as a JSON number."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierq.catalog import builtin_prices
from tierq.pricing import Prices, cost, decimal_text, render_cost

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
