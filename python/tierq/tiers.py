"""The tiers, and the tier rule of DESIGN.md.

`Tier` is the one declaration of the tier names on the Python side, made of
the core's lanes (`tierq._core.TIERS`, in lane order). `resolve_tier` turns a
request's raw `service_tier` value and the model's priority and flex flags into
the tier that is applied, echoed and billed.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

import orjson

from tierq._core import TIERS

__all__ = ["InvalidTier", "Tier", "TierReason", "one_of", "resolve_tier"]


class Tier(StrEnum):
    """A tier tierq sells, which is one of the core's lanes.

    A `str` (``Tier.PRIORITY == "priority"``), so the JSON echo, ledger rows,
    metrics labels and TOML keys carry the plain name; iteration is in lane
    order, and `lane` is the core's lane index.
    """

    PRIORITY = TIERS[0]
    DEFAULT = TIERS[1]
    FLEX = TIERS[2]

    @property
    def lane(self) -> int:
        """The core's index of this lane (`Lane as usize`)."""
        return _LANE[self]


class TierReason(StrEnum):
    """Why a request was served below the tier it asked for (a downgrade): the
    `x-tierq-service-tier-reason` header and the ledger's `tier_reason`."""

    RAMP = "ramp"  # its key's priority rate grew faster than its ramp rule allows
    BUDGET = "budget"  # its key's priority budget for the UTC day is spent


_LANE: Final[dict[Tier, int]] = {tier: i for i, tier in enumerate(Tier)}
if tuple(Tier) != TIERS:
    # The core's lanes changed without this enum: fail at import, not on a request.
    raise ImportError(f"tierq.tiers.Tier {tuple(Tier)} does not match the core's lanes {TIERS}")

# "fast" is OpenAI's alias of "priority".
_PRIORITY_NAMES: Final = frozenset({Tier.PRIORITY.value, "fast"})
# A tier a client may name that tierq does not sell ("scale"), or flex on a
# model without it, is served, and billed, as default rather than refused: a
# client written for another provider keeps working and is never charged for a
# tier it did not get.
_DEFAULT_NAMES: Final = frozenset({"auto", Tier.DEFAULT.value, "scale"})
_ACCEPTED: Final = f"'auto', '{Tier.DEFAULT}', '{Tier.FLEX}', 'scale', '{Tier.PRIORITY}' or 'fast'"


class InvalidTier(ValueError):
    """A `service_tier` outside the table: the request gets a 400, nothing else."""

    param: Final = "service_tier"

    def __init__(self, value: object) -> None:
        self.value = value
        super().__init__(
            f"Invalid value for 'service_tier': {_show(value)}. "
            f"Supported values are {_ACCEPTED}."
        )


def one_of(quote: str) -> str:
    """The tier names for an error message: `'priority', 'default' or 'flex'`."""
    names = [f"{quote}{tier}{quote}" for tier in Tier]
    return ", ".join(names[:-1]) + " or " + names[-1]


def resolve_tier(requested: object, model_priority: bool, model_flex: bool = False) -> Tier:
    """The applied tier for a request's `service_tier` on a model.

    Absent (pass None), null, "auto", "default" and "scale" apply "default";
    "priority" and "fast" apply "priority" only on a priority-enabled model,
    "flex" applies "flex" only on a flex-enabled one, else "default". Anything
    else (other strings, numbers, booleans, objects, arrays) raises
    InvalidTier. Names are case-sensitive, as in OpenAI's API.
    """
    if requested is None:
        return Tier.DEFAULT
    # type() rather than isinstance(): a str subclass is not JSON input, and the
    # check also keeps bools (an int subclass) out by construction.
    if type(requested) is str:
        if requested in _PRIORITY_NAMES:
            return Tier.PRIORITY if model_priority else Tier.DEFAULT
        if requested == Tier.FLEX.value:
            return Tier.FLEX if model_flex else Tier.DEFAULT
        if requested in _DEFAULT_NAMES:
            return Tier.DEFAULT
    raise InvalidTier(requested)


def _show(value: object) -> str:
    """The bad value as JSON (as the client wrote it), cut short if long."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
