"""Exact request cost and its JSON rendering.

cost = (prompt_tokens x input_per_m + completion_tokens x output_per_m) / 1e6
       x tier multiplier, in Decimal with no rounding anywhere; rendered into
responses as a plain JSON number carrying exactly those digits.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

import orjson

__all__ = [
    "DEFAULT_PRIORITY_MULTIPLIER",
    "Prices",
    "cost",
    "decimal_text",
    "multiplier_for",
    "render_cost",
]

DEFAULT_PRIORITY_MULTIPLIER: Final = Decimal("1.5")

# Precision high enough that no product of realistic token counts and prices is
# ever rounded; Inexact is trapped so a rounding would fail loudly, not bill
# a different amount from the one echoed.
_EXACT: Final = decimal.Context(prec=80, traps=[decimal.Inexact, decimal.InvalidOperation])


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per 1M tokens, at the default tier."""

    input_per_m: Decimal
    output_per_m: Decimal


def multiplier_for(tier: str, priority_multiplier: Decimal) -> Decimal:
    """The price multiplier of an applied tier: 1 for default."""
    return priority_multiplier if tier == "priority" else Decimal(1)


def cost(
    prompt_tokens: int,
    completion_tokens: int,
    prices: Prices,
    tier: str,
    priority_multiplier: Decimal = DEFAULT_PRIORITY_MULTIPLIER,
) -> Decimal:
    """Exact USD cost of a request served at `tier` (the applied tier)."""
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts must be >= 0")
    # The context's own methods, not `with localcontext()`: the same exact
    # arithmetic without switching the thread's context (bench/test_request_path.py
    # measures both; the difference is within the machine's noise).
    c = _EXACT
    raw = c.add(c.multiply(prompt_tokens, prices.input_per_m),
                c.multiply(completion_tokens, prices.output_per_m))
    # scaleb shifts the exponent: an exact division by 10^6.
    return c.multiply(c.scaleb(raw, -6), multiplier_for(tier, priority_multiplier))


def decimal_text(value: Decimal) -> str:
    """Plain decimal digits, no exponent, no trailing zeros ("0.0000675", "0", "12")."""
    if not value.is_finite():
        raise ValueError(f"not a finite amount: {value}")
    if value.is_zero():
        return "0"
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def render_cost(value: Decimal) -> orjson.Fragment:
    """`value` as a JSON number for orjson, digit for digit (never via float)."""
    return orjson.Fragment(decimal_text(value).encode())
