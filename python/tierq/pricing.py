"""Exact request cost, in integers, and its JSON rendering.

A model's prices (USD per 1M tokens, exact decimals) become, once, whole
femto-USD (1e-15 USD) per token at each tier: price x tier multiplier x 1e9
(priority: `priority_multiplier`, flex: `flex_multiplier`, default: 1).
A request's cost is then prompt x input rate + completion x output rate, an
integer sum with no rounding; it is rendered into responses once, as a plain
JSON number with exactly those digits, and the ledger keeps the same value.

This module holds the one rule for money: a price (times the multiplier) that
is not a whole number of femto-USD per token is refused when the price table
is loaded (at most 9 decimals per 1M tokens), never rounded.

It also prices a request's service for fair queuing (`fair_charge`): what the
core counts against the request's flow inside a lane.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Final

import orjson

from tierq.tiers import Tier

__all__ = [
    "DEFAULT_FLEX_MULTIPLIER",
    "DEFAULT_PRIORITY_MULTIPLIER",
    "FAIR_UNIT_FEMTO",
    "FEMTO_PER_USD",
    "Prices",
    "Rates",
    "cost",
    "cost_femto",
    "decimal_text",
    "fair_charge",
    "femto_decimal",
    "femto_per_token",
    "femto_text",
    "multiplier_for",
    "rates",
    "render_cost",
    "render_femto",
]

DEFAULT_PRIORITY_MULTIPLIER: Final = Decimal("1.5")
# OpenAI's and Google's flex tiers: about half the standard price.
DEFAULT_FLEX_MULTIPLIER: Final = Decimal("0.5")
FEMTO_PER_USD: Final = 10**15
# USD per 1M tokens -> femto-USD per token: x 1e15 / 1e6.
_FEMTO_PER_TOKEN_PER_USD_PER_M: Final = 10**9


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per 1M tokens, at the default tier."""

    input_per_m: Decimal
    output_per_m: Decimal


@dataclass(frozen=True, slots=True)
class Rates:
    """Femto-USD per token at one tier: what a request's cost is summed from."""

    input: int
    output: int


def multiplier_for(tier: Tier, priority_multiplier: Decimal,
                   flex_multiplier: Decimal = DEFAULT_FLEX_MULTIPLIER) -> Decimal:
    """The price multiplier of an applied tier: 1 for default."""
    if tier == Tier.PRIORITY:
        return priority_multiplier
    return flex_multiplier if tier == Tier.FLEX else Decimal(1)


def femto_per_token(price_per_m: Decimal, multiplier: Decimal = Decimal(1)) -> int:
    """`price_per_m` x `multiplier` in whole femto-USD per token; ValueError if it
    is not whole (more than 9 decimals per 1M tokens) or not a finite amount >= 0."""
    if not price_per_m.is_finite() or not multiplier.is_finite() or price_per_m < 0 or multiplier < 0:
        raise ValueError(f"not a finite amount >= 0: {price_per_m} x {multiplier}")
    exact = price_per_m * multiplier * _FEMTO_PER_TOKEN_PER_USD_PER_M
    whole = exact.to_integral_value()
    if exact != whole:
        shown = decimal_text(price_per_m) + ("" if multiplier == 1 else f" x {decimal_text(multiplier)}")
        raise ValueError(f"{shown} USD per 1M tokens is not a whole number of femto-USD "
                         "(1e-15) per token: use at most 9 decimals per 1M tokens")
    return int(whole)


def rates(prices: Prices, tier: Tier, priority_multiplier: Decimal = DEFAULT_PRIORITY_MULTIPLIER,
          flex_multiplier: Decimal = DEFAULT_FLEX_MULTIPLIER) -> Rates:
    """A model's per-token rates at an applied tier (made once per model and tier)."""
    mult = multiplier_for(tier, priority_multiplier, flex_multiplier)
    return Rates(femto_per_token(prices.input_per_m, mult), femto_per_token(prices.output_per_m, mult))


def cost_femto(prompt_tokens: int, completion_tokens: int, r: Rates) -> int:
    """Exact cost of a request in femto-USD."""
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts must be >= 0")
    return prompt_tokens * r.input + completion_tokens * r.output


# Fair queuing's unit of service: one nano-USD (1e-9) at the model's prices.
# The cheapest catalog price (0.01 USD per 1M tokens) is 10 units a token, and
# a flow's counter in u64 holds 1.8e10 USD of service.
FAIR_UNIT_FEMTO: Final = 10**6


def fair_charge(prompt_tokens: int, completion_tokens: int, r: Rates) -> int:
    """The service `prompt_tokens` and `completion_tokens` cost at rates `r` (the
    model's default-tier rates: inside one lane every request pays the same
    multiplier), in FAIR_UNIT_FEMTO, rounded up: so an output token weighs what
    the price table says against an input one. Never 0 for a request: at least 1,
    and a free model (both prices 0) counts its tokens."""
    if r.input == 0 and r.output == 0:
        return max(1, prompt_tokens + completion_tokens)
    return max(1, -(-cost_femto(prompt_tokens, completion_tokens, r) // FAIR_UNIT_FEMTO))


def cost(
    prompt_tokens: int,
    completion_tokens: int,
    prices: Prices,
    tier: Tier,
    priority_multiplier: Decimal = DEFAULT_PRIORITY_MULTIPLIER,
    flex_multiplier: Decimal = DEFAULT_FLEX_MULTIPLIER,
) -> Decimal:
    """Exact USD cost of a request served at `tier` (the applied tier), as a Decimal."""
    return femto_decimal(cost_femto(prompt_tokens, completion_tokens,
                                    rates(prices, tier, priority_multiplier, flex_multiplier)))


def femto_decimal(femto: int) -> Decimal:
    """Femto-USD as an exact Decimal of USD (what the ledger's rows carry), with
    no trailing zeros: the digits `femto_text` renders."""
    return Decimal(femto_text(femto))


def femto_text(femto: int) -> str:
    """Femto-USD as plain USD digits, no exponent, no trailing zeros ("0.0000675", "0", "12")."""
    if femto < 0:
        raise ValueError(f"not an amount >= 0: {femto}")
    # On the digits: a third of the time of divmod and a formatted fraction.
    digits = str(femto)
    if len(digits) > 15:
        whole, frac = digits[:-15], digits[-15:].rstrip("0")
    else:
        whole, frac = "0", digits.rjust(15, "0").rstrip("0")
    return f"{whole}.{frac}" if frac else whole


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


def render_femto(femto: int) -> orjson.Fragment:
    """A cost in femto-USD as a JSON number of USD for orjson, digit for digit."""
    return orjson.Fragment(femto_text(femto).encode())


def render_cost(value: Decimal) -> orjson.Fragment:
    """An exact amount (a price) as a JSON number for orjson, digit for digit (never via float)."""
    return orjson.Fragment(decimal_text(value).encode())
